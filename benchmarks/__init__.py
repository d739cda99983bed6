"""fastws benchmarks: every scenario against fastws and its peers on this machine.

Run from the repository root: ``python -m benchmarks`` (see README.md here).
"""

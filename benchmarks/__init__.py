"""fastws benchmarks: each one compares fastws against a plain baseline on this machine.

Run from the repository root, e.g. ``python -m benchmarks.fanout``.
"""

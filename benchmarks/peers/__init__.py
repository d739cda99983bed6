"""Baseline servers that fastws is measured against, written the obvious way."""

"""Benchmarks of keybatch; see benchmarks/README.md."""

"""Benchmarks against the physical floor: `python -m benchmarks.run_all` (see benchmarks/README in RESULTS.md)."""

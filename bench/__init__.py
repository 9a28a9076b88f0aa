"""Benchmarks (not tests): ``python bench/run.py [--quick]``; see bench/README.md."""

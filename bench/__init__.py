"""Benchmarks against peers; run as `python -m bench.<name>`. Not part of the installed package."""

"""Benchmarks: each prints one JSON object of figures (``python -m bench.<name> --help``)."""

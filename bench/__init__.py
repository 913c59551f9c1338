"""Benchmarks: ratios measured in one run on one device, printed as tables and written as JSON."""

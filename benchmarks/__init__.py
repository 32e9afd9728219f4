"""Benchmarks (``ktl bench …``). Each prints ratios or distributions measured in one run, side by side."""

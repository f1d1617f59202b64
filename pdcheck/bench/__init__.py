"""Benchmarks (`pdcheck bench ...`): figures as medians, each beside a baseline measured in the same run."""

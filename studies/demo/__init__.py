"""Synthetic studies for the demo, the tests and the benchmarks: no patient data in the
repository."""

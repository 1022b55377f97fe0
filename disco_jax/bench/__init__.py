"""Benchmark scripts (run as modules, e.g. `python -m disco_jax.bench.knn`); not tests.

Nothing here imports jax at package import time: a script may need to set XLA_FLAGS first.
"""

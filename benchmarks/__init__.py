"""Benchmarks: jaxent against optax, plain autodiff and the memory floor.

Run ``python -m benchmarks.run --help`` for the side-by-side harness.
"""

"""Benchmarks (``pipeline bench MODE``): each mode is a module with a ``main(argv)``."""

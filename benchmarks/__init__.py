"""Benchmarks for rnnstream: ``python -m benchmarks.engine_bench`` (also ``rnnstream bench``)."""

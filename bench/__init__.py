"""The benchmark (docs/benchmark.md): `python -m bench.run` from the repository root."""

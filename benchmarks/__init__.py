"""The benchmark suite: run it with benchmarks/run (python -m benchmarks)."""

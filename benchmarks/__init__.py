"""Speed and memory benchmarks of the pipeline: `python -m benchmarks [--quick]` (see README.md)."""

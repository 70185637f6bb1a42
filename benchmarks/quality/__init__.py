"""Quality benchmarks: accuracy of sparse-training methods at equal step budgets (docs/results.md)."""

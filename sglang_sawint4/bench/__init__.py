"""Benchmarks and end-to-end checks (kernels, serving, reliability); results under bench/results/."""

"""Evaluation benchmarks and metrics for the vlm toolkit."""

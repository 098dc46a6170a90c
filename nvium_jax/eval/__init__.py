"""Evaluation and benchmarks that read a model, never the trainer."""

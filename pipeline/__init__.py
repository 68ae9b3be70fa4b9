"""Llama 3 inference pipeline: weights -> artifacts -> benchmarks -> report, driven by conf/ and DVC."""

"""Tensor- and pipeline-parallel torch runner for the converted checkpoints (launch with torchrun)."""

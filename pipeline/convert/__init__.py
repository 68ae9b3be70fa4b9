"""Checkpoint formats: FasterTransformer (ft.py), TensorRT-LLM (trtllm.py), and back to Hugging Face (hf.py)."""

"""A Hugging Face model directory as the later stages read it: config.json, the reference
LlamaForCausalLM, the tokenizer, and seeded random token ids for directories without one.

Every stage after `weights` (export, calibrate, evaluate) and the embedded model's training read the
directory through these functions only, so "what a model directory must contain" is written once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError, read_json

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def read_config(model_dir: Path) -> dict[str, Any]:
    """model_dir/config.json as a dict."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the weights stage first (dvc repro weights)")
    return read_json(path, "rerun the weights stage (dvc repro weights)")


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The Hugging Face reference model, in eval mode (safetensors only, no remote code)."""
    model_dir = Path(model_dir)
    model_type = read_config(model_dir).get("model_type")
    if model_type != "llama":
        raise PipelineError(f"{model_dir / CONFIG_FILE}: model_type is {model_type!r}; only 'llama' models are "
                            f"supported")
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                            trust_remote_code=False, attn_implementation=attn_implementation).eval()


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the model directory brings a tokenizer. Random presets made with model.tokenizer=source
    have none (their manifest says "tokenizer": false); accuracy stages then feed seeded random ids."""
    return (Path(model_dir) / TOKENIZER_FILE).is_file()


def load_tokenizer(model_dir: Path):
    if not has_tokenizer(model_dir):
        raise PipelineError(f"{Path(model_dir) / TOKENIZER_FILE}: not found; the model directory needs its tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # JSON, encoding and tokenizers errors of a damaged file: it is named, not traced back
        raise PipelineError(f"{model_dir}: its tokenizer files could not be loaded "
                            f"({(str(e).splitlines() or [type(e).__name__])[0]}); rerun the weights stage "
                            f"(dvc repro weights)") from None


def random_token_ids(model_dir: Path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded uniform token ids in [0, vocab_size) of model_dir/config.json -> int64 array of shape."""
    vocab = read_config(model_dir).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise PipelineError(f"{Path(model_dir) / CONFIG_FILE}: vocab_size is {vocab!r}, expected a positive integer")
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int64)

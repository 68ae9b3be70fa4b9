"""Session-wide cache of the tiny models and converted checkpoints the convert/parallel tests share.

pytest fixtures defined in one test module are not visible in another, so each module wraps a Store in a
fixture, and the Store memoises models and checkpoints at module level: each is built once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import load_file

_CACHE: dict[tuple, Path] = {}

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 300]]
NEW_TOKENS = 4
# 'gqa': the default tiny (8 heads, 2 KV heads, vocab 512, llama3 RoPE); 'mha': 8 KV heads and vocab 510,
# not a multiple of 4, so tp=4 pads lm_head; 'tied': tied embeddings (Llama 3.2 style).
VARIANTS = {"mha": {"num_kv_heads": 8, "vocab_size": 510}, "tied": {"tie_word_embeddings": True}}


class Store:
    def __init__(self, tmp_path_factory, default_cfg, tiny_model_dir: Path):
        self.factory, self.cfg = tmp_path_factory, default_cfg
        _CACHE.setdefault(("model", "gqa"), tiny_model_dir)

    def model(self, name: str) -> Path:
        key = ("model", name)
        if key not in _CACHE:
            from pipeline import weights

            model = dataclasses.replace(self.cfg.model, name=f"tiny-{name}", **VARIANTS[name])
            out = self.factory.mktemp(f"model-{name}") / "weights"
            weights.build(model, out)
            _CACHE[key] = out
        return _CACHE[key]

    def checkpoint(self, model: str, fmt: str, tp: int, pp: int, dtype: str = "fp32", **options) -> Path:
        key = (model, fmt, tp, pp, dtype, tuple(sorted(options.items())))
        if key not in _CACHE:
            from pipeline.convert import ft, trtllm

            out = self.factory.mktemp(f"{fmt}-{model}-tp{tp}pp{pp}-{dtype}") / "ckpt"
            (ft if fmt == "ft" else trtllm).convert(self.model(model), out, tp=tp, pp=pp, dtype=dtype, **options)
            _CACHE[key] = out
        return _CACHE[key]

    def hf(self, model: str) -> dict:
        return load_file(str(self.model(model) / "model.safetensors"))

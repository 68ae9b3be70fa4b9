"""The shape of a Llama 3 model (what every format's config says), with no torch import: config validation,
the tensor table and the converters read it; pipeline/model/llama.py builds the forward pass from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from pipeline.errors import PipelineError

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: Optional[dict] = None  # llama3 only: {key: value for key in LLAMA3_ROPE_KEYS}
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any], source: str) -> "LlamaArgs":
        """From a Hugging Face config.json: transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`)."""
        def need(key: str):
            if raw.get(key) is None:
                raise PipelineError(f"{source}: required key '{key}' is missing; is this a Llama config.json?")
            return raw[key]

        if raw.get("model_type") not in (None, "llama"):
            raise PipelineError(f"{source}: model_type is {raw.get('model_type')!r}, expected 'llama'")
        rope = dict(raw.get("rope_parameters") or {})
        if not rope:  # transformers 4 layout, as published Llama 3 repos still have it
            rope = dict(raw.get("rope_scaling") or {})
            rope["rope_theta"] = raw.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise PipelineError(f"{source}: rope type {rope_type!r} is not supported (only default and llama3)")
        if "rope_theta" not in rope:
            raise PipelineError(f"{source}: required key 'rope_theta' is missing (in rope_parameters or top level)")
        scaling = None
        if rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
            if missing:
                raise PipelineError(f"{source}: llama3 rope scaling lacks '{missing[0]}'")
            scaling = {k: rope[k] for k in LLAMA3_ROPE_KEYS}
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
            num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads), rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=float(rope["rope_theta"]), max_position_embeddings=int(need("max_position_embeddings")),
            rope_scaling=scaling, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            # Llama 3.x Instruct lists several end tokens; the first is the canonical one.
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def hf_config(self) -> dict[str, Any]:
        """Keyword arguments for transformers.LlamaConfig (transformers 5 names)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(rope_type="llama3", **self.rope_scaling)
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
                    max_position_embeddings=self.max_position_embeddings, rope_parameters=rope,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=self.eos_token_id, attention_bias=False, mlp_bias=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def padded_vocab(vocab_size: int, tp: int) -> int:
    """lm_head rows after zero-padding to a multiple of tp (TensorRT-LLM's pad_vocab_size)."""
    return -(-vocab_size // tp) * tp

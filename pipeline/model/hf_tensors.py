"""The Hugging Face Llama tensor table: every parameter's name, shape, how random init draws it, and which
dimension a tensor-parallel split cuts. Random init, both converters and the shard loaders read it.

Names use "{}" for the layer index. Shapes are in HF orientation, [out, in]. `split`: 0 = column-parallel
(rows = output features), 1 = row-parallel (columns = input features, output all-reduced), None = the same
full tensor on every TP rank."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.model.args import LlamaArgs, padded_vocab


@dataclass(frozen=True)
class TensorSpec:
    shape: Callable[[LlamaArgs], tuple[int, ...]]   # the full (tp=1) shape
    split: Optional[int]
    init: str  # "normal" (std INIT_STD) or "ones" (RMSNorm weights), as LlamaForCausalLM initialises


def _q(a: LlamaArgs) -> int:
    return a.num_heads * a.head_dim


def _kv(a: LlamaArgs) -> int:
    return a.num_kv_heads * a.head_dim


# Checkpoint order: embedding, then each layer's tensors in this order, then norm and lm_head.
GLOBAL_FIRST = {
    # Replicated: TensorRT-LLM use_parallel_embedding=false; FasterTransformer's wte is whole on every rank.
    "model.embed_tokens.weight": TensorSpec(lambda a: (a.vocab_size, a.hidden_size), None, "normal"),
}
LAYER = {
    "model.layers.{}.input_layernorm.weight": TensorSpec(lambda a: (a.hidden_size,), None, "ones"),
    "model.layers.{}.self_attn.q_proj.weight": TensorSpec(lambda a: (_q(a), a.hidden_size), 0, "normal"),
    # KV heads are split like q heads, or replicated (one head per rank) when tp > num_kv_heads.
    "model.layers.{}.self_attn.k_proj.weight": TensorSpec(lambda a: (_kv(a), a.hidden_size), 0, "normal"),
    "model.layers.{}.self_attn.v_proj.weight": TensorSpec(lambda a: (_kv(a), a.hidden_size), 0, "normal"),
    "model.layers.{}.self_attn.o_proj.weight": TensorSpec(lambda a: (a.hidden_size, _q(a)), 1, "normal"),
    "model.layers.{}.post_attention_layernorm.weight": TensorSpec(lambda a: (a.hidden_size,), None, "ones"),
    "model.layers.{}.mlp.gate_proj.weight": TensorSpec(lambda a: (a.intermediate_size, a.hidden_size), 0, "normal"),
    "model.layers.{}.mlp.up_proj.weight": TensorSpec(lambda a: (a.intermediate_size, a.hidden_size), 0, "normal"),
    "model.layers.{}.mlp.down_proj.weight": TensorSpec(lambda a: (a.hidden_size, a.intermediate_size), 1, "normal"),
}
GLOBAL_LAST = {
    "model.norm.weight": TensorSpec(lambda a: (a.hidden_size,), None, "ones"),
    # Zero-padded to a multiple of tp rows, then split (TensorRT-LLM pad_vocab_size); absent when tied.
    "lm_head.weight": TensorSpec(lambda a: (a.vocab_size, a.hidden_size), 0, "normal"),
}
TENSORS = {**GLOBAL_FIRST, **LAYER, **GLOBAL_LAST}
KV = ("model.layers.{}.self_attn.k_proj.weight", "model.layers.{}.self_attn.v_proj.weight")
Q, K, V = (f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "qkv")


_LAYER_RE = re.compile(r"^(model\.layers\.|transformer\.layers\.)(\d+)\.(.+)$")


def template(name: str) -> tuple[str, int | None]:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 3)."""
    m = _LAYER_RE.match(name)
    if not m:
        return name, None
    return f"{m.group(1)}{{}}.{m.group(3)}", int(m.group(2))


def names(args: LlamaArgs) -> list[str]:
    """Every parameter name of LlamaForCausalLM(args), in checkpoint order (no lm_head when tied)."""
    out = list(GLOBAL_FIRST)
    out += [t.format(layer) for layer in range(args.num_layers) for t in LAYER]
    out += [n for n in GLOBAL_LAST if not (n == "lm_head.weight" and args.tie_word_embeddings)]
    return out


def full_shape(tmpl: str, args: LlamaArgs) -> tuple[int, ...]:
    return TENSORS[tmpl].shape(args)


def local_shape(tmpl: str, args: LlamaArgs, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's piece of `tmpl`."""
    spec = TENSORS[tmpl]
    shape = list(spec.shape(args))
    if spec.split is None:
        return tuple(shape)
    if tmpl in KV:
        shape[0] = max(args.num_kv_heads // tp, 1) * args.head_dim
    elif tmpl == "lm_head.weight":
        shape[0] = padded_vocab(args.vocab_size, tp) // tp
    else:
        shape[spec.split] //= tp
    return tuple(shape)

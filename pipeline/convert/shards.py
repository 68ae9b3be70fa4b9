"""Cutting each Hugging Face tensor into tensor-parallel pieces, and putting the pieces back.

Which dimension each tensor splits along is in the tensor table (pipeline/model/hf_tensors.py). Both formats
split the same way (Megatron style); they differ only in names, fusion and orientation, which
pipeline/convert/ft.py and trtllm.py handle. Tensors here are in HF orientation, [out, in]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.model.hf_tensors import KV, TENSORS
from pipeline.model.args import LlamaArgs, padded_vocab

def kv_replicas(args: LlamaArgs, tp: int) -> int:
    """How many TP ranks hold the same KV head: tp/nkv when tp > nkv (TensorRT-LLM dup_kv_weight), else 1."""
    return tp // args.num_kv_heads if tp > args.num_kv_heads else 1


def shard(tmpl: str, w: torch.Tensor, args: LlamaArgs, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank tp_rank's piece of one HF tensor (`tmpl` is its name with "{}" for the layer)."""
    dim = TENSORS[tmpl].split
    if dim is None:
        return w
    if tmpl in KV and tp > args.num_kv_heads:
        # Each KV head repeated tp/nkv times consecutively, then split: rank r gets head r // (tp/nkv).
        head = tp_rank // kv_replicas(args, tp)
        return w.view(args.num_kv_heads, args.head_dim, -1)[head].contiguous()
    if tmpl == "lm_head.weight":
        w = F.pad(w, (0, 0, 0, padded_vocab(args.vocab_size, tp) - args.vocab_size))
    return torch.chunk(w, tp, dim=dim)[tp_rank].contiguous()


def merge(tmpl: str, pieces: list[torch.Tensor], args: LlamaArgs, where: str) -> torch.Tensor:
    """Inverse of shard(): pieces[r] from TP rank r. Copies that must be equal are checked to be equal."""
    tp = len(pieces)
    dim = TENSORS[tmpl].split
    if dim is None:
        _check_equal(pieces, where)
        return pieces[0]
    if tmpl in KV and tp > args.num_kv_heads:
        rep = kv_replicas(args, tp)
        for head in range(args.num_kv_heads):
            _check_equal(pieces[head * rep:(head + 1) * rep], where)
        return torch.cat(pieces[::rep], dim=0)
    full = torch.cat(pieces, dim=dim)
    if tmpl == "lm_head.weight":
        pad = full[args.vocab_size:]
        if pad.numel() and torch.count_nonzero(pad):
            raise PipelineError(f"{where}: lm_head padding rows beyond vocab_size={args.vocab_size} are not zero")
        full = full[:args.vocab_size]
    return full


def _check_equal(pieces: list[torch.Tensor], where: str) -> None:
    for p in pieces[1:]:
        if not torch.equal(p, pieces[0]):
            raise PipelineError(f"{where}: copies that every TP rank must share differ between ranks")

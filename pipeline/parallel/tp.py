"""Tensor parallelism for pipeline.model.llama (gpt-fast's tp.py approach: local shapes + forward hooks).

The model is built with each rank's local sizes, so the linears are already split:
  column-parallel  q/k/v_proj, gate/up_proj   [out/tp, in]   need no communication
  row-parallel     o_proj, down_proj          [out, in/tp]   partial sums -> all-reduce over the TP group
  lm_head          [ceil(V/tp), H] rows       local logits -> all-gather over the TP group, drop padding
Embedding, norms and residuals are replicated, so every TP rank of a stage holds identical activations."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pipeline.model.llama import Llama
from pipeline.parallel.mapping import Mapping


def new_tp_group(mapping: Mapping) -> Optional[dist.ProcessGroup]:
    """This rank's TP group. new_group is collective: every rank creates every stage's group, in order."""
    if mapping.tp == 1:
        return None
    mine = None
    for pp_rank in range(mapping.pp):
        group = dist.new_group([mapping.rank_of(t, pp_rank) for t in range(mapping.tp)])
        if pp_rank == mapping.pp_rank:
            mine = group
    return mine


def row_parallel(linear: torch.nn.Linear, group: dist.ProcessGroup) -> None:
    """Sum the partial outputs of a row-parallel linear over the TP group."""
    def hook(_module, _inputs, output):
        dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output

    linear.register_forward_hook(hook)


def gathered_logits(lm_head: torch.nn.Linear, group: dist.ProcessGroup, tp: int, vocab_size: int) -> None:
    """Concatenate every rank's vocab slice (rank order = vocab order) and drop the zero padding rows."""
    def hook(_module, _inputs, output):
        parts = [torch.empty_like(output) for _ in range(tp)]
        dist.all_gather(parts, output.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    lm_head.register_forward_hook(hook)


def apply_tp(model: Llama, group: Optional[dist.ProcessGroup], tp: int) -> Llama:
    if tp == 1:
        return model
    for block in model.model.layers.values():
        row_parallel(block.self_attn.o_proj, group)
        row_parallel(block.mlp.down_proj, group)
    if model.last:
        gathered_logits(model.lm_head, group, tp, model.args.vocab_size)
    return model

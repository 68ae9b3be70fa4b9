"""Tensor parallelism for pipeline.model.llama (gpt-fast's tp.py approach: local shapes + forward hooks that
call functional collectives, so a compiled decode step traces its collectives instead of breaking on them).

The model is built with each rank's local sizes, so the linears are already split:
  column-parallel  wqkv (q|k|v), w13 (gate|up)  [out/tp, in]   need no communication
  row-parallel     o_proj, down_proj            [out, in/tp]   partial sums -> all-reduce over the TP group
  lm_head          [ceil(V/tp), H] rows         local logits -> all-gather over the TP group, drop padding
Embedding, norms and residuals are replicated, so every TP rank of a stage holds identical activations.

The hooks sit on the attention and MLP modules and on the model, not on their linears, so replacing a linear
(weight quantization) keeps them. `_functional_collectives` return new tensors (waited on first use) where
`dist.all_reduce` would mutate its argument in place, which torch.compile cannot capture."""

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


def all_reduce_output(module: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Sum `module`'s output (the partial sums of its row-parallel linear) over the TP group."""
    from torch.distributed import _functional_collectives as funcol

    module.register_forward_hook(lambda _module, _inputs, output: funcol.all_reduce(output, "sum", group))


def gathered_logits(model: Llama, group: dist.ProcessGroup, vocab_size: int) -> None:
    """Concatenate every rank's vocab slice of the logits (rank order = vocab order), drop the zero padding."""
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single is all_gather_tensor renamed: torch 2.13 deprecates the old name, older torch lacks the new.
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor

    def hook(_module, _inputs, output):
        return gather(output.contiguous(), output.dim() - 1, group)[..., :vocab_size]

    model.register_forward_hook(hook)


def apply_tp(model: Llama, group: Optional[dist.ProcessGroup], tp: int) -> Llama:
    if tp == 1:
        return model
    for block in model.model.layers.values():
        all_reduce_output(block.self_attn, group)
        all_reduce_output(block.mlp, group)
    if model.last:
        gathered_logits(model, group, model.args.vocab_size)
    return model

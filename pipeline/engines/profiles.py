"""TensorRT optimization profiles of the ONNX decoder (pipeline/onnx_io.py's interface), as plain data.

A profile gives [min, opt, max] for three dims: batch, seq (new tokens of a call) and past (tokens already in
the KV cache). Every dynamic input of the graph follows from them: input_ids and position_ids are
[batch, seq], attention_mask is [batch, past + seq], each past K/V is [batch, kv_heads, past, head_dim]."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from pipeline.onnx_io import input_names

DIMS = ("batch", "seq", "past")
Profiles = Mapping[str, Mapping[str, Sequence[int]]]  # name -> dim -> [min, opt, max], in profile-index order


def covering_profile(profiles: Profiles, batch: int, seq: int, past: int) -> Optional[str]:
    """The first profile whose [min, max] ranges hold one call's shapes, or None."""
    want = {"batch": batch, "seq": seq, "past": past}
    for name, dims in profiles.items():
        if all(dims[d][0] <= want[d] <= dims[d][2] for d in DIMS):
            return name
    return None


def input_shapes(dims: Mapping[str, Sequence[int]], num_layers: int, kv_heads: int,
                 head_dim: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """One profile's (min, opt, max) shape of every graph input."""
    b, s, p = (tuple(dims[d]) for d in DIMS)
    total = tuple(x + y for x, y in zip(p, s))
    shapes = {"input_ids": tuple(zip(b, s)), "attention_mask": tuple(zip(b, total)), "position_ids": tuple(zip(b, s))}
    for name in input_names(num_layers)[3:]:
        shapes[name] = tuple((bi, kv_heads, pi, head_dim) for bi, pi in zip(b, p))
    return shapes


def uncovered_calls(profiles: Profiles, batch: int, prompt: int, output: int) -> Optional[tuple[int, int, int]]:
    """The first (batch, seq, past) call of one generation (a prefill of `prompt` tokens, then output - 1 decode
    steps) that no profile holds, or None."""
    if covering_profile(profiles, batch, prompt, 0) is None:
        return batch, prompt, 0
    for past in range(prompt, prompt + output - 1):
        if covering_profile(profiles, batch, 1, past) is None:
            return batch, 1, past
    return None

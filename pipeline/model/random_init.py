"""Seeded random weights in Hugging Face Llama layout, written shard by shard.

Each tensor draws from its own generator, seeded from (model.seed, tensor name), so the bytes are
identical on every run and machine, and memory stays bounded by one tensor even for 70B shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import save_file

from pipeline.model.args import LlamaArgs
from pipeline.model.hf_config import llama_config
from pipeline.model.hf_tensors import TENSORS, full_shape, names, template
from pipeline.progress import progress_bar

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

INIT_STD = 0.02  # LlamaConfig.initializer_range
SHARD_BYTES = 4 << 30


def llama_args(model: ModelConfig) -> LlamaArgs:
    """The shape of a preset (all shape keys set) as the model package describes it."""
    return LlamaArgs.from_hf_config(llama_config(model).to_dict(), f"model={model.name}")


def tensor_specs(model: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every parameter of LlamaForCausalLM, in checkpoint order (the tensor table)."""
    args = llama_args(model)
    return [(name, full_shape(template(name)[0], args), TENSORS[template(name)[0]].init) for name in names(args)]


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(seed: int, name: str, shape: tuple[int, ...], init: str, dtype: torch.dtype) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=gen).to(dtype)


def _shards(specs, itemsize: int) -> Iterator[list[tuple[str, tuple[int, ...], str]]]:
    shard, size = [], 0
    for spec in specs:
        nbytes = itemsize * int(torch.Size(spec[1]).numel())
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = [], 0
        shard.append(spec)
        size += nbytes
    if shard:
        yield shard


def write_random_weights(model: ModelConfig, out_dir: Path) -> int:
    """Write model*.safetensors (+ index when sharded) into out_dir; return the parameter count."""
    dtype = getattr(torch, model.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = tensor_specs(model)
    shards = list(_shards(specs, itemsize))
    total_bytes = sum(itemsize * torch.Size(s[1]).numel() for s in specs)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    with progress_bar(f"random init ({model.name}, {model.dtype})", total=total_bytes, unit="bytes") as advance:
        for file_name, shard in zip(names, shards):
            tensors = {}
            for name, shape, init in shard:
                tensors[name] = make_tensor(model.seed, name, shape, init, dtype)
                weight_map[name] = file_name
                advance(tensors[name].numel() * itemsize)
            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(torch.Size(s[1]).numel() for s in specs)

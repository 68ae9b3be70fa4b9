"""Back to Hugging Face: read every rank of a FasterTransformer or TensorRT-LLM checkpoint and merge the
shards into a LlamaForCausalLM state dict (bit for bit the original when the checkpoint is fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import artifacts
from pipeline.convert import ft, trtllm
from pipeline.model.hf_tensors import template
from pipeline.convert.shards import merge
from pipeline.errors import PipelineError
from pipeline.model import hf_tensors
from pipeline.model.args import LlamaArgs
from pipeline.parallel.mapping import Mapping
from pipeline.versions import library_versions

FORMATS = {"ft": ft, "trtllm": trtllm}


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise PipelineError(f"checkpoint format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return FORMATS[fmt]


def to_hf_state_dict(fmt: str, ckpt_dir: Path) -> tuple[LlamaArgs, dict[str, torch.Tensor]]:
    """(LlamaArgs, HF state dict) of a converted checkpoint; the whole manifest is verified first."""
    module = format_module(fmt)
    artifacts.verify_manifest(Path(ckpt_dir))
    args, info = module.read_config(ckpt_dir)
    # FasterTransformer files carry no PP split: read them as one stage.
    world = Mapping(info["tp"], info["pp"] if fmt == "trtllm" else 1)
    pieces: dict[str, list[torch.Tensor]] = {}
    for m in world.all_ranks():
        _, _, shards = module.read_rank(ckpt_dir, m)
        for name, tensor in shards.items():
            pieces.setdefault(name, [None] * world.tp)[m.tp_rank] = tensor
    state = {name: merge(template(name)[0], parts, args, f"{ckpt_dir}: {name}") for name, parts in pieces.items()}
    if args.tie_word_embeddings:
        lm_head = state.pop("lm_head.weight")
        if not torch.equal(lm_head, state["model.embed_tokens.weight"]):
            raise PipelineError(f"{ckpt_dir}: tie_word_embeddings is set but lm_head differs from the embedding")
    names = hf_tensors.names(args)
    if sorted(state) != sorted(names):
        raise PipelineError(f"{ckpt_dir}: merged names differ from a Llama state dict "
                            f"({sorted(set(names) ^ set(state))[:1]})")
    return args, {name: state[name] for name in names}


def write_hf(fmt: str, ckpt_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A Hugging Face directory (config.json + model.safetensors + manifest.json) from a checkpoint.
    No tokenizer: copy it from the source model directory if one is needed."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    args, state = to_hf_state_dict(fmt, ckpt_dir)
    dtype = next(iter(state.values())).dtype
    with artifacts.atomic_dir(Path(out_dir)) as tmp:
        LlamaConfig(**args.hf_config(), dtype=str(dtype).removeprefix("torch."),
                    architectures=["LlamaForCausalLM"]).save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return artifacts.write_manifest(tmp, kind="hf-model", source_format=fmt, source_checkpoint=str(ckpt_dir),
                                        config=args.to_dict(), versions=library_versions())

"""Loaders of the project's Llama module: one rank's stage from a converted checkpoint (either format), for the
TP x PP runner and the torch-tp backend; the whole model from a Hugging Face directory, for torch-compiled."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.convert import ft
from pipeline.convert.common import HFCheckpoint
from pipeline.model import hf_tensors
from pipeline.model.hf_tensors import template
from pipeline.convert.hf import format_module
from pipeline.errors import PipelineError
from pipeline.model.llama import Llama, hf_layout_state_dict
from pipeline.parallel.mapping import Mapping
from pipeline.precision import torch_dtype


def load_stage(fmt: str, ckpt_dir: Path, mapping: Mapping, device: torch.device,
               dtype: Optional[str] = None) -> tuple[Llama, dict]:
    """Build this rank's Llama stage from either format. dtype=None computes in the checkpoint's dtype."""
    args, info, state = format_module(fmt).read_rank(Path(ckpt_dir), mapping)
    compute = torch_dtype(dtype or info.get("compute_dtype") or info["dtype"])
    state = {k: v.to(compute) for k, v in state.items()}
    if info.get("int8_mode") == 1:
        # FasterTransformer quantizes each rank's float linears at load time; emulate it on this rank's shards.
        state = {k: ft.quantize_weight_only(v) if template(k)[0] in ft.INT8_LINEARS else v for k, v in state.items()}
    layers = mapping.layers(args.num_layers, fmt)
    with torch.device("meta"):
        model = Llama(args, tp=mapping.tp, layers=layers, first=mapping.is_first_stage, last=mapping.is_last_stage)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # a missing or leftover name raises
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise PipelineError(f"{ckpt_dir}: rank {mapping.rank} weights do not fit the model ({detail})") from None
    return model.to(device).eval(), {**info, "compute_dtype": str(compute).removeprefix("torch.")}


def load_hf(model_dir: Path, device: torch.device, dtype: str) -> Llama:
    """The whole model (tp=1, every layer) from a Hugging Face directory (config.json + safetensors, no remote
    code), computing in `dtype`'s torch dtype; q/k/v and gate/up are fused as the weights load."""
    ckpt = HFCheckpoint(model_dir)
    ckpt.check_names("Llama module")
    compute = torch_dtype(dtype)
    state = hf_layout_state_dict({n: ckpt.get(n).to(compute) for n in hf_tensors.names(ckpt.args)}, ckpt.args)
    with torch.device("meta"):
        model = Llama(ckpt.args)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise PipelineError(f"{model_dir}: weights do not fit the model of its config.json ({detail})") from None
    return model.to(device).eval()

"""What running a backend asks of this machine: the model's shape (from the weights), and the GPU count, memory
and precision a backend needs under params.yaml. The launcher, the engine stages and `python -m pipeline doctor`
all ask here, so each gives the same reason (pipeline/requirements.py words it). Light: no backend is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import requirements
from pipeline.backends.registry import BackendSpec
from pipeline.benchmark import roofline
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs


def model_shape(weights_dir: Path) -> dict[str, Any]:
    """The model's shape (LlamaArgs as a dict) from the weights' config.json: the roofline's input."""
    path = Path(weights_dir) / "config.json"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; rerun the weights stage (dvc repro)")
    return LlamaArgs.from_hf_config(json.loads(path.read_text()), source=str(path)).to_dict()


def backend_target(cfg: PipelineConfig, backend: BackendSpec, shape: dict[str, Any] | None) -> requirements.Target:
    """What running `backend` under `cfg` asks of the machine; `shape` (LlamaArgs as a dict, None = not known
    yet) sizes the weights for the GPU-memory check."""
    device = "cuda" if backend.gpu_only else cfg.hardware.device
    gpus = cfg.parallel.world_size if backend.distributed or backend.own_parallelism else 1
    weights = roofline.stored_weight_bytes(LlamaArgs(**shape), cfg.precision.name) if shape else None
    return requirements.Target(device, cfg.precision.name, gpus, weights, cfg.model.name)


def environment_problem(cfg: PipelineConfig, backend: BackendSpec, shape: dict[str, Any] | None,
                        env: requirements.Environment | None = None) -> str | None:
    """Why this machine cannot run `backend` (a package, the GPU), or None; what the registry declares about
    precisions and devices is BackendSpec.cannot_run's."""
    return requirements.why_not(requirements.Needs(backend.requires), env or requirements.probe(),
                                backend_target(cfg, backend, shape))

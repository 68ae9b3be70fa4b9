"""Backend name -> what it needs and can do, and where its class lives. The name is also the params value
(`benchmark.backends`), the metrics key and the MLflow tag.

Adding a backend = one module with a `Backend` subclass + one entry here declaring its precisions, devices,
whether it runs distributed, and which artifact it loads (per precision). Config validation reads these
declarations (so this module stays light: no torch, no backend imports), and the benchmark hands each backend
the explicit path of the artifact it declared."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Union

from pipeline.errors import PipelineError
from pipeline.precision import FLOAT_PRECISIONS, WEIGHT_QUANT_PRECISIONS

@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str                      # "module:Class"
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    distributed: bool                # launched under torchrun with parallel.tp x parallel.pp ranks
    artifact: Union[str, dict]       # a pipeline.paths.ARTIFACTS kind, or {precision: kind}
    summary: str

    def artifact_for(self, precision: str) -> str:
        return self.artifact[precision] if isinstance(self.artifact, dict) else self.artifact

    def cannot_run(self, precision: str, device: str) -> Optional[str]:
        """Why this backend cannot run (precision, device), or None."""
        if precision not in self.precisions:
            return f"backend {self.name} runs precisions {', '.join(self.precisions)}, not {precision}"
        if device not in self.devices:
            return f"backend {self.name} runs on {', '.join(self.devices)}, not {device}"
        return None


BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("torch", "pipeline.backends.torch_eager:TorchEagerBackend", FLOAT_PRECISIONS, ("cpu", "cuda"),
                distributed=False, artifact="hf_weights",
                summary="Hugging Face LlamaForCausalLM, eager, dynamic KV cache (the reference)"),
    BackendSpec("torch-compiled", "pipeline.backends.torch_compiled:TorchCompiledBackend",
                FLOAT_PRECISIONS + WEIGHT_QUANT_PRECISIONS, ("cpu", "cuda"), distributed=False, artifact="hf_weights",
                summary="the project's Llama module: fused wqkv/w13, static KV cache, decode step compiled "
                        "(benchmark.compile; CUDA graphs on CUDA)"),
    BackendSpec("onnxruntime", "pipeline.backends.onnxruntime:OnnxRuntimeBackend", ("fp32", "int8"),
                ("cpu", "cuda"), distributed=False, artifact={"fp32": "onnx", "int8": "onnx_int8"},
                summary="the exported ONNX decoder (fp32) or its INT8 QDQ graph, KV cache bound in onnxruntime"),
    BackendSpec("torch-tp", "pipeline.backends.torch_tp:TorchTPBackend", FLOAT_PRECISIONS, ("cpu", "cuda"),
                distributed=True, artifact="trtllm_checkpoint",
                summary="the project's TP x PP runner on the TensorRT-LLM checkpoint, under torchrun"),
)}


def spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise PipelineError(f"benchmark.backends: unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def load_backend_class(name: str):
    module_name, class_name = spec(name).target.split(":")
    return getattr(importlib.import_module(module_name), class_name)

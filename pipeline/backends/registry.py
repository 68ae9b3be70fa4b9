"""Backend name -> import path. The name is also the params value, the metrics key and the MLflow tag.

Only this light module is imported by config validation; a backend's heavy dependencies load when it
is selected (see `load_backend_class`)."""

from __future__ import annotations

import importlib

from pipeline.errors import PipelineError

BACKENDS: dict[str, str] = {
    "torch": "pipeline.backends.torch_eager:TorchEagerBackend",
    "torch-tp": "pipeline.backends.torch_tp:TorchTPBackend",
    "onnxruntime": "pipeline.backends.onnxruntime:OnnxRuntimeBackend",
}


def load_backend_class(name: str):
    if name not in BACKENDS:
        raise PipelineError(f"benchmark.backends: unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)

"""Versions of the libraries that shape an artifact, recorded in manifests and MLflow."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "huggingface_hub", "onnx", "onnxruntime",
            "onnxruntime-gpu", "tensorrt", "tensorrt-llm", "dvc", "mlflow", "hydra-core")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions

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
    # Serving benchmark (stage serve): "continuous" = its own in-flight batching engine, "static" = the
    # prefill/decode adapter (pipeline/backends/requests.py), "" = not a serving backend (see serving_absent).
    serving: str = "static"
    serving_absent: str = ""
    # False: no prefill/decode calls for the benchmark stage (an engine with its own scheduler: serving only).
    steps: bool = True
    # pipeline/requirements.py PACKAGES keys this backend imports; `python -m pipeline doctor` and the launcher
    # check them (and a GPU when devices is cuda only) before anything loads.
    requires: tuple[str, ...] = ()
    # True: it spreads parallel.tp x parallel.pp over GPUs itself (not under torchrun); it needs that many GPUs.
    own_parallelism: bool = False
    options: str = ""                # the params section handed to it as BackendInputs.options ("" = none)

    @property
    def gpu_only(self) -> bool:
        return self.devices == ("cuda",)

    def artifact_for(self, precision: str) -> str:
        return self.artifact[precision] if isinstance(self.artifact, dict) else self.artifact

    def cannot_benchmark(self) -> Optional[str]:
        """Why the benchmark stage (prefill/decode timing) cannot drive this backend, or None."""
        return None if self.steps else (f"backend {self.name} schedules requests itself and has no prefill/decode "
                                        f"calls to time; serve it instead (serving.backends)")

    def cannot_serve(self) -> Optional[str]:
        """Why the serving benchmark cannot drive this backend, or None."""
        return None if self.serving else f"backend {self.name} has no request-level engine: {self.serving_absent}"

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
                        "(benchmark.compile; CUDA graphs on CUDA)", serving="continuous"),
    BackendSpec("onnxruntime", "pipeline.backends.onnxruntime:OnnxRuntimeBackend", ("fp32", "int8"),
                ("cpu", "cuda"), distributed=False, artifact={"fp32": "onnx", "int8": "onnx_int8"},
                summary="the exported ONNX decoder (fp32) or its INT8 QDQ graph, KV cache bound in onnxruntime"),
    BackendSpec("torch-tp", "pipeline.backends.torch_tp:TorchTPBackend", FLOAT_PRECISIONS, ("cpu", "cuda"),
                distributed=True, artifact="trtllm_checkpoint",
                summary="the project's TP x PP runner on the TensorRT-LLM checkpoint, under torchrun", serving="",
                serving_absent="its ranks run one SPMD loop under torchrun, and a scheduler reacting to arrival "
                               "times would diverge across ranks; serve it with tp=pp=1 as torch-compiled"),
    BackendSpec("tensorrt", "pipeline.backends.tensorrt:TensorRTBackend", ("fp32", "fp16", "bf16", "int8"), ("cuda",),
                distributed=False, artifact="trt_engine", requires=("tensorrt",), options="tensorrt",
                summary="a TensorRT engine of the exported ONNX decoder (stage build_engine, strongly typed), torch "
                        "tensors as I/O buffers, KV cache kept on the GPU"),
    BackendSpec("tensorrt-llm", "pipeline.backends.trtllm:TrtllmBackend", ("fp16", "bf16"), ("cuda",),
                distributed=False, artifact="hf_weights", requires=("tensorrt_llm",), steps=False, own_parallelism=True, options="trtllm",
                serving="continuous", summary="TensorRT-LLM's LLM API, PyTorch flow, on the Hugging Face weights "
                                              "(in-flight batching, paged KV cache, tp x pp over its own workers)"),
    BackendSpec("tensorrt-llm-engine", "pipeline.backends.trtllm:TrtllmEngineBackend", ("fp16", "bf16"), ("cuda",),
                distributed=False, artifact="trtllm_engine", requires=("tensorrt_llm_engine",), steps=False,
                own_parallelism=True, options="trtllm", serving="continuous",
                summary="TensorRT-LLM <= 1.2 engines built by trtllm-build from the convert_trtllm checkpoint "
                        "(stage build_trtllm_engine), run by the engine LLM API"),
)}


def spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise PipelineError(f"benchmark.backends: unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def load_backend_class(name: str):
    module_name, class_name = spec(name).target.split(":")
    return getattr(importlib.import_module(module_name), class_name)

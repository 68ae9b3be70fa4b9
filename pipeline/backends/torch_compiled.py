"""Backend `torch-compiled`: the project's own Llama module (pipeline/model/llama.py) on the Hugging Face weights
(artifacts/weights), gpt-fast style: q/k/v and gate/up fused at load (4 matmuls per layer), a static KV cache
sized per scenario in prepare(), the decode step compiled (benchmark.compile; on CUDA captured into a CUDA
graph, pipeline/model/fused.py), prefill eager or compiled (benchmark.compile_prefill). On CUDA every batch-1
matmul runs the Triton GEMV of pipeline/model/gemv.py (float weights through GemvLinear, 8-bit weights
through the quantized linears).

Compile time is never inside a latency: prepare() compiles and records the step for the scenario's shape
before the runner's warm-up and timed runs, a compiled prefill compiles each new shape on a call of its own,
and describe() reports both (conditions: compile_s, per shape)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline.backends.base import Backend
from pipeline.backends.requests import EngineLimits, RequestEngine
from pipeline.errors import PipelineError
from pipeline.model import gemv
from pipeline.precision import WEIGHT_QUANT_PRECISIONS

# Inductor / FX graph cache, git-ignored, relative to the project root (the benchmark stage's working directory).
INDUCTOR_CACHE_DIR = Path(".cache/inductor")


class TorchCompiledBackend(Backend):
    def load(self) -> None:
        from pipeline.convert.load import load_hf
        from pipeline.model.fused import DecodeStep, compile_enabled

        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError("hardware.device=cuda but torch sees no CUDA device; use hardware=cpu")
        compiled = compile_enabled(self.inputs.compile, self.device)
        quantized = self.precision in WEIGHT_QUANT_PRECISIONS
        if quantized:
            from pipeline.model import quant

            quant.check_supported(self.precision, self.device)
        self.model = load_hf(self.artifact, self.device, self.precision)
        if quantized:
            quant.quantize_(self.model, self.precision)  # after fusion: wqkv / w13 are quantized whole
        elif self.device.type == "cuda":
            gemv.route_float_linears_(self.model)  # batch-1 decode matmuls through the Triton GEMV
        self.step = DecodeStep(self.model, compiled, INDUCTOR_CACHE_DIR)
        self.pos = 0  # next position, on the host: the cache bound is checked without a device sync
        self.prefill_compiled = compiled and self.inputs.compile_prefill
        self.prefill_fn = self._prefill
        self.prefill_compile_s: dict[str, float] = {}  # "prefill_bs{b}_in{len}" -> seconds
        if self.prefill_compiled:
            self.prefill_fn = torch.compile(self._prefill, fullgraph=True, dynamic=False)

    def _prefill(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, new_sequence=True, last_only=True)[:, -1].argmax(dim=-1)

    @torch.inference_mode()
    def prepare(self, batch_size: int, max_seq_len: int) -> None:
        self.model.setup_cache(batch_size, max_seq_len)
        # Inputs made as decode() makes them (inference tensors, a [b] -> [b, 1] view): dynamo guards on such
        # properties, and any difference would recompile at the first timed decode. The warm-up writes cache
        # position 0, which every prefill overwrites.
        self.input_pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        tokens = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.step.warm_up(lambda: self.step(tokens[:, None], self.input_pos))

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        self._check_room(length)
        positions = torch.arange(length, device=self.device)
        input_ids = input_ids.to(self.device)
        key = f"prefill_bs{input_ids.shape[0]}_in{length}"
        if self.prefill_compiled and key not in self.prefill_compile_s:
            # Compile this shape on a call of its own (it writes the same cache rows the real call rewrites).
            t0 = time.perf_counter()
            self.prefill_fn(input_ids, positions)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prefill_compile_s[key] = round(time.perf_counter() - t0, 3)
        tokens = self.prefill_fn(input_ids, positions)
        self.input_pos = positions[-1:] + 1
        self.pos = length
        return tokens

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_room(self.pos + 1)
        next_tokens = self.step(tokens[:, None], self.input_pos)
        self.input_pos += 1
        self.pos += 1
        return next_tokens

    def request_engine(self, limits: EngineLimits) -> RequestEngine:
        """Continuous batching (pipeline/backends/continuous.py) on this model, with a decode step of its own
        compiled for many batch sizes at once (fused.DecodeStep dynamic_batch)."""
        from pipeline.backends.continuous import ContinuousBatchEngine
        from pipeline.model.fused import DecodeStep

        # CUDA: one dynamic-batch graph. CPU (compile=inductor only): a graph per bucket, since inductor cannot
        # lower the CPU int8 kernel (_weight_int8pack_mm) with a symbolic batch.
        self.step = DecodeStep(self.model, self.step.compiled, INDUCTOR_CACHE_DIR,
                               dynamic_batch=self.device.type == "cuda")
        return ContinuousBatchEngine(self.model, self.step, limits)

    def _check_room(self, length: int) -> None:
        if length > self.model.max_seq_len:
            raise PipelineError(f"backend {self.name}: {length} positions exceed the KV cache of "
                                f"{self.model.max_seq_len} that prepare() sized; call prepare() with the scenario's "
                                f"prompt + output length")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": "pipeline.model.llama (fused wqkv/w13, static KV cache)",
                "decode_step": self.step.kind,
                "prefill": "inductor" if self.prefill_compiled else "eager",
                "compile_s": round(sum(self.step.compile_s.values()) + sum(self.prefill_compile_s.values()), 3),
                "compile_s_by_shape": {**self.step.compile_s, **self.prefill_compile_s},
                "inductor_cache": INDUCTOR_CACHE_DIR.as_posix() if self.step.compiled else None}

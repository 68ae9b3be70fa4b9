"""The greedy decode step of pipeline.model.llama, eager or fused into one compiled graph (gpt-fast recipe).

On CUDA the step is `torch.compile(mode="reduce-overhead", fullgraph=True)`: inductor fuses the elementwise
work around the 4 matmuls per layer and the whole step replays as one CUDA graph, which removes the per-kernel
launch cost that dominates a batch-1 decode. On CPU, mode "default" (no CUDA graphs). Prefill stays eager: it
runs once per request with a prompt-sized shape, and SDPA's flash kernel already serves it.

Shapes are static (dynamic=False): each (batch, max_seq_len) the caches are sized for compiles once, and the
inductor/FX graph cache in `cache_dir` makes a second run of the same shapes load instead of recompile.
The caller warms a new shape up (`warm_up`) outside any timing and reports that time as compile time."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import PipelineError
from pipeline.model.llama import Llama

# benchmark.compile: auto = inductor on CUDA, eager on CPU. (Not on/off: YAML reads those as booleans.)
COMPILE_SETTINGS = ("auto", "inductor", "eager")
# CUDA-graph trees: call 1 runs eagerly (warm-up), call 2 records the graph, call 3 is the first replay.
WARM_UP_CALLS = 3


def compile_enabled(setting: str, device: torch.device) -> bool:
    if setting not in COMPILE_SETTINGS:
        raise PipelineError(f"benchmark.compile must be one of {', '.join(COMPILE_SETTINGS)}; got {setting!r}")
    return setting == "inductor" or (setting == "auto" and device.type == "cuda")


def _configure_inductor(cache_dir: Path) -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Read by inductor at each cache access (and set by it on first use), so set it outright, before compiling.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    inductor_config.coordinate_descent_tuning = True
    inductor_config.fx_graph_cache = True
    inductor_config.triton.unique_kernel_names = True
    # One compiled graph per benchmark scenario shape; the default limit (8) would silently fall back to eager.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)


class DecodeStep:
    """step(x [b, 1], input_pos [1]) -> next greedy tokens [b] on the last stage, else hidden states [b, 1, H]
    for the next pipeline stage. Updates the model's KV cache at input_pos."""

    def __init__(self, model: Llama, compiled: bool, cache_dir: Path):
        self.model, self.compiled = model, compiled
        self.device = next(model.parameters()).device
        self.compile_s: dict[str, float] = {}  # "bs{batch}_len{max_seq_len}" -> seconds of its warm-up
        self.fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._step
        if compiled:
            _configure_inductor(cache_dir)
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.fn = torch.compile(self._step, mode=mode, fullgraph=True, dynamic=False)

    @property
    def kind(self) -> str:
        if not self.compiled:
            return "eager"
        return "inductor, CUDA graphs (reduce-overhead)" if self.device.type == "cuda" else "inductor"

    def _step(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        y = self.model(x, input_pos)
        return y[:, -1].argmax(dim=-1) if self.model.last else y

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.fn(x, input_pos)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # A CUDA-graph replay writes its output into the same static buffer every time: copy it out before the
        # next replay (the caller feeds these tokens back in).
        return self.fn(x, input_pos).clone()

    def warm_up(self, run_once: Callable[[], object]) -> float:
        """Compile (or load from the cache) and record the step for the shapes setup_cache() just set, by calling
        `run_once` (one decode pass, as the caller drives it: alone or through every pipeline stage) WARM_UP_CALLS
        times. Returns the seconds it took, also kept in compile_s; 0 and no call when eager."""
        if not self.compiled:
            return 0.0
        key = f"bs{self.model.cache_batch}_len{self.model.max_seq_len}"
        t0 = time.perf_counter()
        for _ in range(WARM_UP_CALLS):
            run_once()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.compile_s[key] = round(self.compile_s.get(key, 0.0) + seconds, 3)
        return seconds

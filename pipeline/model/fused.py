"""The greedy decode step of pipeline.model.llama, eager or fused into one compiled graph (gpt-fast recipe).

The step is `torch.compile(fullgraph=True)`: inductor fuses the elementwise work around the 4 matmuls per
layer. On CUDA the compiled step is then captured into one CUDA graph per shape (torch.cuda.CUDAGraph, with
static input and output buffers), which removes the per-kernel launch cost that dominates a batch-1 decode.
The capture is done here rather than by mode="reduce-overhead" because its cudagraph-trees bookkeeping costs
0.5-0.9 ms of host time per step, exposed whenever the caller syncs after each token (as a server streaming
tokens does): measured on an H200, 6.03 ms per synced step against 5.46 ms of kernel time. Prefill stays
eager by default (see compile_prefill).

Shapes are static (dynamic=False): each (batch, max_seq_len) the caches are sized for compiles once, and the
inductor/FX graph cache in `cache_dir` makes a second run of the same shapes load instead of recompile.
The caller warms a new shape up (`warm_up`) outside any timing and reports that time as compile time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.model.llama import Llama

# benchmark.compile: auto = inductor on CUDA, eager on CPU. (Not on/off: YAML reads those as booleans.)
COMPILE_SETTINGS = ("auto", "inductor", "eager")
# warm_up: call 1 compiles, runs twice on a side stream and captures the graph; calls 2-3 replay it.
WARM_UP_CALLS = 3
# Compiled calls on a side stream before a capture (kernels autotuned, lazy CUDA state such as cuBLAS
# workspaces created), as torch.cuda.graphs' documentation asks.
CAPTURE_WARM_UP_CALLS = 2


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


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor      # static inputs: each call copies into them, then replays
    pos: torch.Tensor
    out: torch.Tensor    # static output, overwritten by every replay


class DecodeStep:
    """step(x [b, 1], input_pos [1] or [b, 1]) -> next greedy tokens [b] on the last stage, else hidden states
    [b, 1, H] for the next pipeline stage. Updates the model's KV cache at input_pos (per row when [b, 1])."""

    def __init__(self, model: Llama, compiled: bool, cache_dir: Path, dynamic_batch: bool = False):
        self.model, self.compiled = model, compiled
        self.device = next(model.parameters()).device
        self.compile_s: dict[str, float] = {}  # "bs{batch}_len{max_seq_len}" -> seconds of its warm-up
        self.graphs: dict[tuple, _Graph] = {}
        self.fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._step
        # dynamic_batch: one graph for every batch of 2 or more rows (continuous batching runs many batch-size
        # buckets; each still gets a CUDA graph of its own, and a 1-row batch its own static graph, where the
        # GEMV runs). Compiling each bucket statically costs 30-55 s per bucket on the 8B shape.
        self.dynamic_batch = dynamic_batch
        if compiled:
            _configure_inductor(cache_dir)
            self.fn = torch.compile(self._step, fullgraph=True, dynamic=None if dynamic_batch else False)

    def _mark(self, x: torch.Tensor, input_pos: torch.Tensor) -> None:
        if self.compiled and self.dynamic_batch and x.shape[0] >= 2:
            torch._dynamo.mark_dynamic(x, 0)
            if input_pos.dim() == 2:
                torch._dynamo.mark_dynamic(input_pos, 0)

    @property
    def kind(self) -> str:
        if not self.compiled:
            return "eager"
        return "inductor, one CUDA graph per shape" if self.device.type == "cuda" else "inductor"

    def _step(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        y = self.model(x, input_pos)
        return y[:, -1].argmax(dim=-1) if self.model.last else y

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not (self.compiled and self.device.type == "cuda"):
            self._mark(x, input_pos)
            return self.fn(x, input_pos)
        # The graph reads the cache tensors setup_cache() made: a new cache (version) needs a new capture.
        key = (tuple(x.shape), x.dtype, tuple(input_pos.shape), self.model.cache_version)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(x, input_pos)
        g.x.copy_(x)
        g.pos.copy_(input_pos)
        g.graph.replay()
        # Every replay writes the same output buffer: hand out a copy (the caller feeds these tokens back in).
        return g.out.clone()

    def _capture(self, x: torch.Tensor, input_pos: torch.Tensor) -> _Graph:
        # Graphs of older caches hold memory and can never replay again.
        version = self.model.cache_version
        self.graphs = {k: v for k, v in self.graphs.items() if k[-1] == version}
        static_x, static_pos = x.clone(), input_pos.clone()
        self._mark(static_x, static_pos)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARM_UP_CALLS):
                self.fn(static_x, static_pos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(static_x, static_pos)
        return _Graph(graph, static_x, static_pos, out)

    def warm_up(self, run_once: Callable[[], object]) -> float:
        """Compile (or load from the cache) and capture the step for the shapes setup_cache() just set, by calling
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

"""Timing loop shared by every backend: untimed warm-up, then measured greedy generations.

One scenario = (batch_size, prompt_length). Each run sends batch_size requests at once (a static
batch) and times every output token with a device sync, so the numbers are what a client would see."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.backends.base import Backend
from pipeline.benchmark import hardware, roofline
from pipeline.benchmark.stats import PERCENTILE_METHOD, request_metrics, summarize
from pipeline.config import BenchmarkConfig
from pipeline.model.args import LlamaArgs
from pipeline.progress import progress_bar


@dataclass(frozen=True)
class Scenario:
    batch_size: int
    prompt_length: int
    output_length: int

    @property
    def key(self) -> str:
        return f"bs{self.batch_size}_in{self.prompt_length}_out{self.output_length}"


@dataclass(frozen=True)
class RooflineInputs:
    """What the roofline of each result needs besides the scenario (the launcher puts it in the job)."""

    model: LlamaArgs
    hardware: dict[str, Any]   # HardwareConfig as a dict: published figures, or measure=True
    lm_head_quantized: bool    # only matters for 8-bit precisions


def scenarios(bench: BenchmarkConfig) -> list[Scenario]:
    return [Scenario(b, p, bench.output_length) for p in bench.prompt_lengths for b in bench.batch_sizes]


def generate_timed(backend: Backend, prompt: torch.Tensor, output_length: int) -> tuple[float, list[float]]:
    """Greedy-generate output_length tokens (EOS ignored); return send time and per-token times."""
    backend.synchronize()
    t_send = time.perf_counter()
    token = backend.prefill(prompt)
    backend.synchronize()
    times = [time.perf_counter()]
    for _ in range(output_length - 1):
        token = backend.decode(token)
        backend.synchronize()
        times.append(time.perf_counter())
    return t_send, times


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"


def run_scenario(backend: Backend, scenario: Scenario, bench: BenchmarkConfig, vocab_size: int,
                 cost: roofline.ScenarioRoofline | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Warm-up, measured runs -> (summary, rows); both get the roofline columns when `cost` is given (only the
    reporting rank of a distributed backend has one: the other ranks' results are discarded)."""
    gen = torch.Generator().manual_seed(bench.seed)
    # Random ids (no special tokens) make every prompt exactly prompt_length tokens long.
    prompt = torch.randint(2, vocab_size, (scenario.batch_size, scenario.prompt_length), generator=gen)
    prompt = prompt.to(backend.device)
    backend.prepare(scenario.batch_size, scenario.prompt_length + scenario.output_length)
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    for _ in range(bench.warmup_runs):
        generate_timed(backend, prompt, scenario.output_length)
    rows = []
    with progress_bar(f"{backend.name} {scenario.key}", total=bench.measured_runs,
                      enabled=backend.is_reporting_rank) as advance:
        for i in range(bench.measured_runs):
            t_send, times = generate_timed(backend, prompt, scenario.output_length)
            m = request_metrics(t_send, times)
            tokens = scenario.batch_size * scenario.output_length
            tp, pp = backend.layout()
            rows.append({"backend": backend.name, "scenario": scenario.key, "tp": tp, "pp": pp,
                         "batch_size": scenario.batch_size,
                         "prompt_length": scenario.prompt_length, "output_length": scenario.output_length,
                         "run": i, **{k: round(v, 4) for k, v in m.items()}, "output_tokens": tokens,
                         "tokens_per_s": round(tokens / (m["e2el_ms"] / 1e3), 2)})
            if cost is not None:
                rows[-1].update(cost.fields(ttft_ms=m["ttft_ms"], tpot_ms=m["tpot_ms"]))
            advance(1)
    summary: dict[str, float] = {}
    for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
        summary.update(summarize(name, [r[name] for r in rows]))
    # Runs are sequential, so the benchmark duration D is the sum of their end-to-end latencies.
    duration_s = sum(r["e2el_ms"] for r in rows) / 1e3
    summary["output_token_throughput"] = round(sum(r["output_tokens"] for r in rows) / duration_s, 2)
    summary["request_throughput"] = round(scenario.batch_size * len(rows) / duration_s, 3)
    summary["peak_memory_mb"] = round(_peak_memory_mb(backend.device)[0], 1)
    if cost is not None:  # medians: % of the roofline of the typical run
        summary.update(cost.fields(ttft_ms=summary["ttft_ms_p50"], tpot_ms=summary["tpot_ms_p50"]))
    return summary, rows


def roofline_hardware(backend: Backend, hw: dict[str, Any]) -> tuple[roofline.Hardware, dict[str, Any]]:
    """Figures for the loaded backend's device and precision (measured now, or published) -> (the roofline's
    Hardware, what to record). A tp-way split on GPUs reads its weights on tp devices at once; CPU ranks share
    one memory system; pipeline stages run one after another, so pp adds no device to a step."""
    dtype = roofline.peak_dtype(backend.precision)
    figures = hardware.figures(hw, backend.device, dtype)
    tp, _ = backend.layout()
    devices = tp if backend.device.type == "cuda" else 1
    return roofline.Hardware(figures["memory_bandwidth_gbs"], figures["peak_tflops"], devices), \
        {**figures, "devices": devices}


def benchmark_backend(backend: Backend, bench: BenchmarkConfig, vocab_size: int,
                      roof: RooflineInputs) -> dict[str, Any]:
    """All scenarios for one loaded backend -> {"metrics": {scenario: summary}, "rows": [...], "conditions"}.

    After loading, the reporting rank takes the hardware figures (measuring them when hardware.measure) before
    the first scenario, so every row and summary carries its roofline."""
    t0 = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {"load_s": round(load_s, 3)}
    rows: list[dict[str, Any]] = []
    hw, recorded = roofline_hardware(backend, roof.hardware) if backend.is_reporting_rank else (None, {})
    for scenario in scenarios(bench):
        cost = None if hw is None else roofline.scenario(
            roof.model, backend.precision, scenario.batch_size, scenario.prompt_length, scenario.output_length, hw,
            roof.lm_head_quantized)
        summary, scenario_rows = run_scenario(backend, scenario, bench, vocab_size, cost)
        metrics[scenario.key] = summary
        rows += scenario_rows
    tp, pp = backend.layout()
    conditions = {**backend.describe(), "tp": tp, "pp": pp, "percentile_method": PERCENTILE_METHOD, "ignore_eos": True,
                  "decoding": "greedy", "batching": "static", "warmup_runs": bench.warmup_runs,
                  "measured_runs": bench.measured_runs, "memory_method": _peak_memory_mb(backend.device)[1],
                  "torch_threads": torch.get_num_threads(),
                  "roofline": {**recorded, "lm_head_quantized": roof.lm_head_quantized,
                               "bytes_per_element": dataclasses.asdict(roofline.storage(backend.precision))}}
    return {"metrics": metrics, "rows": rows, "conditions": conditions}

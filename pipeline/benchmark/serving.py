"""The serving benchmark: drive a RequestEngine with a load point's arrivals, stamp every token, compute the
field's metrics from the per-request records.

The records (send time, the time each token reached the host, lengths) are the raw data: every metric below is
recomputed from them (`serving_metrics`), and they are written as a DVC output so anyone can recompute others.
Definitions (vLLM `bench serve`, genai-perf):

    TTFT_i = t_first_i - t_send_i        E2EL_i = t_end_i - t_send_i      TPOT_i = (E2EL_i - TTFT_i) / (N_i - 1)
    ITL = every gap between consecutive tokens of a request, pooled over requests
    D = max t_end - min t_send           throughput = completed / D, sum N_i / D, sum (prompt_i + N_i) / D
    goodput = requests meeting every SLO (per request: TTFT_i <= serving.slo.ttft_ms, ...) / D
    mean concurrency = sum E2EL_i / D (Little's law); KV-slot utilisation = time-weighted busy slots / max_num_seqs

Open loop: a request's send time is its scheduled arrival, even when the loop adds it a step later (the
client sent it then; the wait is the server's). Closed loop: a client sends its next request when its previous
one's last token arrives."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.backends.requests import Request, RequestEngine
from pipeline.benchmark.stats import PERCENTILE_METHOD
from pipeline.benchmark.workload import LoadPoint, arrival_times

SLO_METRICS = ("ttft_ms", "tpot_ms", "e2el_ms")   # per-request values an SLO can bound (vLLM --goodput)
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@dataclass
class RequestRecord:
    id: int
    prompt_len: int
    output_len: int        # tokens asked for
    send_s: float          # seconds from the point's start
    token_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "prompt_len": self.prompt_len, "output_len": self.output_len,
                "send_s": round(self.send_s, 6), "token_s": [round(t, 6) for t in self.token_s]}


@dataclass
class PointRun:
    records: list[RequestRecord]
    slot_seconds: float    # integral of busy slots over time (time-weighted KV-slot use)
    duration_s: float      # first send to last token
    steps: int


def run_point(engine: RequestEngine, requests: Sequence[Request], point: LoadPoint, *, burstiness: float,
              seed: int, clock: Callable[[], float] = time.perf_counter,
              on_finish: Callable[[], None] | None = None) -> PointRun:
    """Send `requests` to `engine` as `point` says; returns every request's record."""
    if point.kind == "rate":
        due = deque(zip(arrival_times(len(requests), point.value, burstiness, seed), requests))
        closed: deque[Request] = deque()
    else:  # closed loop: `concurrency` clients start at once, each sends again when its request ends
        first = int(point.value)
        due = deque((0.0, r) for r in requests[:first])
        closed = deque(requests[first:])
    records = {r.id: RequestRecord(r.id, len(r.prompt), r.max_new_tokens, 0.0) for r in requests}
    slot_seconds, steps, t0 = 0.0, 0, clock()
    perf0 = time.perf_counter()  # Emitted.at is on this clock
    now = 0.0
    while due or closed or engine.has_unfinished_requests():
        now = clock() - t0
        while due and due[0][0] <= now:
            send, request = due.popleft()
            records[request.id].send_s = send
            engine.add_request(request)
        if not engine.has_unfinished_requests():
            if due:  # idle until the next arrival
                time.sleep(max(0.0, due[0][0] - (clock() - t0)))
            continue
        busy = engine.slots_in_use
        emitted = engine.step(max(0.0, due[0][0] - now) if due else None)
        after = clock() - t0
        steps += 1
        slot_seconds += max(busy, engine.slots_in_use) * (after - now)
        for e in emitted:
            records[e.request_id].token_s.append(after if e.at is None else e.at - perf0)
            if e.finished:
                if on_finish:
                    on_finish()
                if closed:
                    due.append((after, closed.popleft()))
    done = list(records.values())
    duration = max(r.token_s[-1] for r in done) - min(r.send_s for r in done)
    return PointRun(done, slot_seconds, duration, steps)


def describe(values: Sequence[float], name: str, percentiles: Sequence[float]) -> dict[str, float]:
    """{name}_mean, _median, _std, _p{p} for each p (numpy linear interpolation, population std as vLLM)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {}
    out = {f"{name}_mean": arr.mean(), f"{name}_median": np.median(arr), f"{name}_std": arr.std()}
    for p in percentiles:
        out[f"{name}_p{p:g}"] = np.percentile(arr, p, method=PERCENTILE_METHOD)
    return {k: round(float(v), 4) for k, v in out.items()}


def per_request(record: RequestRecord) -> dict[str, float]:
    """TTFT, E2EL and TPOT (ms) of one record; TPOT needs two tokens (absent otherwise, as in vLLM)."""
    t = record.token_s
    out = {"ttft_ms": (t[0] - record.send_s) * 1e3, "e2el_ms": (t[-1] - record.send_s) * 1e3}
    if len(t) >= 2:
        out["tpot_ms"] = (out["e2el_ms"] - out["ttft_ms"]) / (len(t) - 1)
    return out


def meets(values: dict[str, float], slo: dict[str, float]) -> bool:
    return all(values.get(name, 0.0) <= bound for name, bound in slo.items())


def serving_metrics(records: Sequence[RequestRecord], percentiles: Sequence[float], slo: dict[str, float],
                    slot_seconds: float | None = None, max_num_seqs: int | None = None) -> dict[str, float]:
    """Every summary metric of one load point, from its records alone (plus the slot integral when given)."""
    done = [r for r in records if len(r.token_s) == r.output_len]
    if not done:
        return {"completed": 0, "failed": len(records)}
    per = [per_request(r) for r in done]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.token_s, r.token_s[1:])]
    start = min(r.send_s for r in done)
    duration = max(r.token_s[-1] for r in done) - start
    out: dict[str, float] = {"completed": len(done), "failed": len(records) - len(done),
                             "duration_s": round(duration, 4)}
    for name in LATENCY_METRICS:
        values = itl if name == "itl_ms" else [p[name] for p in per if name in p]
        out.update(describe(values, name, percentiles))
    output_tokens = sum(len(r.token_s) for r in done)
    out.update({
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(done) / duration, 4),
        "output_token_throughput": round(output_tokens / duration, 2),
        "total_token_throughput": round((output_tokens + sum(r.prompt_len for r in done)) / duration, 2),
        "goodput": round(sum(meets(p, slo) for p in per) / duration, 4),
        "goodput_fraction": round(sum(meets(p, slo) for p in per) / len(done), 4),
        "mean_concurrency": round(sum(p["e2el_ms"] for p in per) / 1e3 / duration, 3),
        "max_concurrency": _max_overlap(done),
    })
    if slot_seconds is not None and max_num_seqs:
        out["kv_slot_utilization"] = round(slot_seconds / (duration * max_num_seqs), 4)
    return out


def _max_overlap(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (sent, last token not yet out)."""
    events = sorted([(r.send_s, 1) for r in records] + [(r.token_s[-1], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _requests(rows: list[list]) -> list[Request]:
    return [Request(int(i), tuple(prompt), int(n)) for i, prompt, n in rows]


def serve_backend(backend, job: dict[str, Any]) -> dict[str, Any]:
    """Load one backend, build its engine, warm it up, run every load point -> {"points", "records",
    "conditions"}. `job` is what launcher.serve_plan wrote (settings, requests, roofline inputs)."""
    import math

    import torch

    from pipeline.backends.requests import EngineLimits, check_fits
    from pipeline.benchmark import hardware, roofline
    from pipeline.benchmark.runner import _peak_memory_mb, roofline_hardware
    from pipeline.benchmark.workload import load_points
    from pipeline.model.args import LlamaArgs
    from pipeline.progress import progress_bar

    s = job["serving"]
    requests, warmup = _requests(job["requests"]), _requests(job["warmup"])
    model = LlamaArgs(**job["model"])
    limits = EngineLimits(s["max_num_seqs"], max(len(r.prompt) + r.max_new_tokens for r in requests + warmup),
                          s["max_num_batched_tokens"], tuple(s["slot_buckets"]))
    for r in requests + warmup:
        check_fits(r, limits, model.max_position_embeddings)
    t0 = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t0
    engine = backend.request_engine(limits)
    compile_s = engine.warm_up()
    hw, recorded = roofline_hardware(backend, job["hardware"])
    mean_in = sum(len(r.prompt) for r in requests) / len(requests)
    mean_out = sum(r.max_new_tokens for r in requests) / len(requests)
    bound = roofline.serving_bound(model, backend.precision, min(limits.max_num_seqs, len(requests)),
                                   round(mean_in), max(2, round(mean_out)), hw, job["lm_head_quantized"])
    if warmup:
        run_point(engine, warmup, LoadPoint("rate", math.inf), burstiness=1.0, seed=s["seed"])
    points, records = {}, {}
    for point in load_points(s["request_rates"], s["concurrencies"]):
        if backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(backend.device)
        with progress_bar(f"{backend.name} {point.label}", total=len(requests)) as advance:
            run = run_point(engine, requests, point, burstiness=s["burstiness"], seed=s["seed"],
                            on_finish=lambda: advance(1))
        m = serving_metrics(run.records, s["percentiles"], s["slo"], run.slot_seconds, limits.max_num_seqs)
        m.update({"engine_steps": run.steps, "peak_memory_mb": round(_peak_memory_mb(backend.device)[0], 1),
                  "throughput_bound": round(bound, 2),
                  "throughput_roofline_pct": round(100 * m["output_token_throughput"] / bound, 3)})
        points[point.key] = {"load": point.kind, "request_rate": point.value if point.kind == "rate" else None,
                             "concurrency": int(point.value) if point.kind == "concurrency" else None, **m}
        records[point.key] = [r.to_json() for r in run.records]
    tp, pp = backend.layout()
    conditions = {**backend.describe(), **engine.describe(), "tp": tp, "pp": pp, "load_s": round(load_s, 3),
                  "compile_s": round(sum(compile_s.values()), 3), "compile_s_by_shape": compile_s,
                  "percentile_method": PERCENTILE_METHOD, "ignore_eos": True, "decoding": "greedy",
                  "memory_method": _peak_memory_mb(backend.device)[1], "torch_threads": torch.get_num_threads(),
                  "mean_input_len": round(mean_in, 2), "mean_output_len": round(mean_out, 2),
                  "throughput_bound": "output tok/s of max_num_seqs-request waves: prefill at peak FLOP/s, decode "
                                      "at the decode roofline (pipeline/benchmark/roofline.py serving_bound)",
                  "roofline": recorded, "environment": hardware.environment(backend.device)}
    return {"points": points, "records": records, "conditions": conditions}

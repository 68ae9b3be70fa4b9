"""NVIDIA's `trtllm-bench throughput` (TensorRT-LLM 1.x) on the serve stage's own requests, its report imported
under the serving metric names of pipeline/benchmark/serving.py, so its numbers sit next to the serve stage's.

What runs: the requests of workload.build_requests (same seed, same lengths, so both benchmarks get identical
requests) as trtllm-bench's JSONL dataset, at each load point of serving.request_rates / serving.concurrencies
that trtllm-bench can send. Its `--concurrency` is all requests at once (-1, the serve stage's rate `inf`) or a
closed loop of K clients (serving.concurrencies); an open-loop Poisson rate has no trtllm-bench equivalent.

Written against trtllm-bench of TensorRT-LLM 1.x; never run here (no GPU, no NVIDIA package index). Read in
NVIDIA/TensorRT-LLM (the stored copies of the code index; where a commit's version is not known, it says so):
  tensorrt_llm/commands/bench.py @0c9a37db (version not pinned): global options --model/-m (a Hugging Face
      *name*: BenchmarkEnvironment rejects a path that exists), --model_path (local checkpoint), group
      `trtllm-bench [global options] throughput [options]`.
  tensorrt_llm/bench/benchmark/throughput.py @000a01de (1.0.0rc4: tensorrt_llm/version.py at that commit) and
      @56851033 (a later 1.x; version not pinned), the same in both: --dataset, --backend (pytorch default;
      tensorrt reads --engine_dir, TensorRT-LLM <= 1.2), --engine_dir, --tp/--pp (default 1), --concurrency
      (default -1, "<=0 for no concurrency limit"), --num_requests (0 = whole dataset), --warmup (default 2),
      --kv_cache_free_gpu_mem_fraction (default .90), --max_batch_size, --max_num_tokens, --streaming (flag),
      --report_json (ReportUtility.get_statistics_dict as JSON), --eos_id (default -1: "Set to -1 to disable
      EOS", passed as SamplingParams(end_id, pad_id)).
  tensorrt_llm/bench/utils/data.py @04276b44 and @a6ad8019 (versions not pinned): one JSON object a line,
      task_id, output_tokens, and token ids as "input_ids" (or "logits"); a prompt is tokenized only without them.
  tensorrt_llm/bench/dataclasses/general.py @0f593773 (version not pinned): InferenceRequest(task_id: int,
      output_tokens: int, input_ids: list[int] alias "input_ids"/"logits").
  tensorrt_llm/bench/dataclasses/reporting.py @2787769c and @02499765 (versions not pinned; the second adds
      "machine"): get_statistics_dict() -> engine.version (version("tensorrt_llm"), or an engine's config.json
      "version"), request_info.{num_requests, avg_num_concurrent_requests, avg_input_length, avg_output_length},
      performance.{total_latency_ms, avg_request_latency_ms, request_throughput_req_s,
      system_output_throughput_tok_s, system_total_throughput_tok_s, request_latency_percentiles_ms},
      and with --streaming only streaming_metrics.{avg_ttft_ms, avg_tpot_ms, ttft_percentiles, tpot_percentiles}.
      Its console report indexes every percentile dict by minimum, maximum, average, p50, p90, p95, p99.
  tensorrt_llm/bench/dataclasses/statistics.py @77d7fe1e (version not pinned): per request TTFT = first token -
      start, TPOT ("intertoken_latency") = (end - first token) / (N - 1), E2E = end - start; percentiles
      sorted(values)[int(n * p)], no interpolation; avg_concurrent_requests = sum(E2E) / total latency.
  tensorrt_llm/bench/benchmark/utils/asynchronous.py @89fd9b74 (version not pinned): max_tokens = output_tokens;
      the run fails unless every request finished ("Benchmark failed"), so completed = the report's num_requests.
  tensorrt_llm/bench/dataclasses/configuration.py @000a01de (1.0.0rc4): KvCacheConfig(enable_block_reuse=False).
Unverified: that the report keys above are unchanged in every 1.x release (they are the same at both reporting.py
commits read, and the importer names any key it misses); the exact releases of the unpinned commits."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline import artifacts
from pipeline.backends.requests import EngineLimits, Request
from pipeline.benchmark.workload import LoadPoint, build_requests, load_points
from pipeline.errors import PipelineError

SOURCE = "trtllm-bench"
BACKENDS = ("pytorch", "tensorrt")  # trtllm-bench --backend values this module drives
PROJECT_BACKEND = {"pytorch": "tensorrt-llm", "tensorrt": "tensorrt-llm-engine"}  # the serve stage's equivalents
PERCENTILE_METHOD = "nearest rank: sorted(values)[int(n * p / 100)], no interpolation (trtllm-bench PercentileStats)"
REPORTED_PERCENTILES = (50, 90, 95, 99)  # the p-keys of every trtllm-bench percentile dict
# Project metrics trtllm-bench does not report, and why (they are left out, never filled in).
ABSENT = {
    "itl_ms_*": "trtllm-bench keeps each request's first and last token times only, not every token's",
    "goodput": "needs every request's TTFT/TPOT/E2EL against serving.slo; the report holds aggregates only",
    "goodput_fraction": "needs every request's TTFT/TPOT/E2EL against serving.slo; the report holds aggregates only",
    "*_std": "trtllm-bench reports no standard deviation",
    "max_concurrency": "needs every request's send and end time; the report holds aggregates only",
    "kv_slot_utilization": "trtllm-bench does not sample the scheduler's busy slots",
}
STREAMING_ONLY = "trtllm-bench writes streaming_metrics (TTFT, TPOT) only when run with --streaming"


# --- the dataset --------------------------------------------------------------------------------------------------


def dataset_lines(requests: Iterable[Request]) -> list[str]:
    """trtllm-bench's dataset: one JSON object a line with the request's token ids, so nothing is re-tokenized."""
    return [json.dumps({"task_id": r.id, "input_ids": list(r.prompt), "output_tokens": r.max_new_tokens})
            for r in requests]


def serve_requests(cfg, weights_dir: Path) -> tuple[list[Request], list[Request]]:
    """(requests, warm-up requests) exactly as stages/serve.py builds them: same function, seed and vocabulary."""
    weights = artifacts.verify_manifest(weights_dir)
    return build_requests(cfg.serving, int(weights["shape"]["vocab_size"]), weights_dir)


# --- the command --------------------------------------------------------------------------------------------------


def bench_concurrency(point: LoadPoint) -> int:
    """trtllm-bench's --concurrency for a load point: -1 = every request at once, K = a closed loop of K clients."""
    if point.kind == "concurrency":
        return int(point.value)
    if math.isinf(point.value):
        return -1
    raise PipelineError(f"serving.request_rates: {point.value:g} req/s is an open-loop (Poisson) rate, which "
                        f"trtllm-bench cannot send (its --concurrency is all at once or a closed loop); it runs "
                        f"rate inf and serving.concurrencies only")


def command(model_dir: Path, dataset: Path, report_json: Path, *, model: str, point: LoadPoint, tp: int, pp: int,
            num_requests: int, warmup: int, backend: str, engine_dir: Path | None = None,
            options: Mapping[str, Any], streaming: bool = True, executable: str = "trtllm-bench") -> list[str]:
    """The argv of one trtllm-bench throughput run. `options`: the trtllm params section with max_batch_size and
    max_num_tokens already capped as the serve stage caps them (runtime_options)."""
    if backend not in BACKENDS:
        raise PipelineError(f"trtllm-bench backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if (backend == "tensorrt") != (engine_dir is not None):
        raise PipelineError("trtllm-bench: the tensorrt backend runs an engine directory (--engine-dir) and the "
                            "pytorch backend the weights; give an engine directory with the tensorrt backend only")
    concurrency = bench_concurrency(point)
    argv = [executable, "--model", model, "--model_path", str(model_dir), "throughput",
            "--dataset", str(dataset), "--backend", backend]
    if engine_dir is not None:
        argv += ["--engine_dir", str(engine_dir)]
    else:  # an engine's own config.json sets its mapping; --tp/--pp are read by the PyTorch flow only
        argv += ["--tp", str(tp), "--pp", str(pp)]
    argv += ["--concurrency", str(concurrency),
             "--num_requests", str(num_requests),
             "--warmup", str(warmup),
             "--kv_cache_free_gpu_mem_fraction", str(options["free_gpu_memory_fraction"]),
             "--max_batch_size", str(options["max_batch_size"]),
             "--max_num_tokens", str(options["max_num_tokens"]),
             "--eos_id", "-1",  # EOS off (its default, said explicitly): every request yields exactly output_tokens
             "--report_json", str(report_json)]
    if streaming:  # per-token arrival: without it trtllm-bench reports no TTFT or TPOT
        argv.append("--streaming")
    return argv


def runtime_options(cfg, requests: Sequence[Request], engine_flow: bool) -> dict[str, Any]:
    """The trtllm section with max_batch_size / max_num_tokens capped exactly as the serve stage's TensorRT-LLM
    backend caps them (serving.max_num_seqs, serving.max_num_batched_tokens, an engine's build sizes)."""
    from pipeline.backends.trtllm import llm_kwargs

    options = cfg.dataclass_dict("trtllm")
    limits = EngineLimits(cfg.serving.max_num_seqs, max(len(r.prompt) + r.max_new_tokens for r in requests),
                          cfg.serving.max_num_batched_tokens)
    kwargs = llm_kwargs(options, limits, cfg.parallel.tp, cfg.parallel.pp, engine_flow)
    return {**options, "max_batch_size": kwargs["max_batch_size"], "max_num_tokens": kwargs["max_num_tokens"]}


# --- the report ---------------------------------------------------------------------------------------------------


def _value(report: Mapping[str, Any], dotted: str, path: Path | str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise PipelineError(f"{path}: no {dotted} in the trtllm-bench report (a TensorRT-LLM version whose "
                                f"report this importer was not written against?)")
        node = node[part]
    return node


def _number(report: Mapping[str, Any], dotted: str, path: Path | str) -> float:
    value = _value(report, dotted, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineError(f"{path}: {dotted} is {value!r} in the trtllm-bench report, expected a finite number")
    return float(value)


def _latency(report: Mapping[str, Any], section: str, name: str, percentiles: Sequence[float],
             path: Path | str) -> tuple[dict[str, float], list[str]]:
    """{name}_mean, _median, _p{p} from one trtllm-bench percentile dict (already in ms); the percentiles asked
    for that trtllm-bench does not compute are returned as absent names."""
    out = {f"{name}_mean": _number(report, f"{section}.average", path),
           f"{name}_median": _number(report, f"{section}.p50", path)}  # its p50 is its median
    absent = []
    for p in percentiles:
        if p in REPORTED_PERCENTILES:
            out[f"{name}_p{p:g}"] = _number(report, f"{section}.p{p:g}", path)
        else:
            absent.append(f"{name}_p{p:g}")
    return {k: round(v, 4) for k, v in out.items()}, absent


def import_report(report: Mapping[str, Any], percentiles: Sequence[float], *, streaming: bool = True,
                  path: Path | str = "trtllm-bench report") -> dict[str, Any]:
    """A trtllm-bench --report_json under the serve stage's metric names (only those it really reports), with
    where it came from, its percentile method and what it leaves out. A missing key fails, naming it and `path`."""
    num = _number(report, "request_info.num_requests", path)
    out: dict[str, Any] = {
        "completed": int(num),
        "failed": 0,  # trtllm-bench fails the whole run unless every request finished
        "duration_s": round(_number(report, "performance.total_latency_ms", path) / 1e3, 4),
        "total_input_tokens": round(_number(report, "request_info.avg_input_length", path) * num),
        "total_output_tokens": round(_number(report, "request_info.avg_output_length", path) * num),
        "request_throughput": round(_number(report, "performance.request_throughput_req_s", path), 4),
        "output_token_throughput": round(_number(report, "performance.system_output_throughput_tok_s", path), 2),
        "total_token_throughput": round(_number(report, "performance.system_total_throughput_tok_s", path), 2),
        # sum of E2E latencies / duration: the serve stage's mean_concurrency (Little's law) too
        "mean_concurrency": round(_number(report, "request_info.avg_num_concurrent_requests", path), 3),
    }
    absent = dict(ABSENT)
    latencies = [("e2el_ms", "performance.request_latency_percentiles_ms")]
    if streaming:
        latencies += [("ttft_ms", "streaming_metrics.ttft_percentiles"),
                      ("tpot_ms", "streaming_metrics.tpot_percentiles")]
    else:
        absent.update(ttft_ms=STREAMING_ONLY, tpot_ms=STREAMING_ONLY)
    for name, section in latencies:
        values, missing = _latency(report, section, name, percentiles, path)
        out.update(values)
        absent.update({m: f"trtllm-bench computes p{', p'.join(map(str, REPORTED_PERCENTILES))} only"
                       for m in missing})
    engine = report.get("engine")
    version = engine.get("version") if isinstance(engine, Mapping) else None  # a run's TensorRT-LLM (or engine's)
    return {"source": SOURCE, "trtllm_version": version, "percentile_method": PERCENTILE_METHOD,
            "streaming": streaming, **out, "absent": absent}


# --- one run ------------------------------------------------------------------------------------------------------


def _stream(argv: list[str], log_path: Path, cwd: Path) -> tuple[int, str]:
    """Run argv with its output on the console and in log_path -> (exit code, last non-empty line)."""
    last = ""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", bufsize=1)
        except OSError as e:  # found on PATH but not runnable (permissions, a broken interpreter line)
            raise PipelineError(f"{argv[0]}: cannot start ({e.strerror or e})") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            if line.strip():
                last = line.strip()
        return proc.wait(), last


def run(requests: Sequence[Request], model_dir: Path, *, model: str, point: LoadPoint, tp: int, pp: int,
        warmup: int, backend: str, options: Mapping[str, Any], percentiles: Sequence[float], log_path: Path,
        engine_dir: Path | None = None, streaming: bool = True, executable: str = "trtllm-bench") -> dict[str, Any]:
    """One trtllm-bench throughput run of `requests` at `point` -> the imported point. Its console output goes to
    the console and to log_path; its report JSON is kept next to the log (log_path with suffix .json)."""
    found = shutil.which(executable)
    if found is None:
        raise PipelineError(f"{executable} is not on PATH; it comes with tensorrt-llm: pip install -e '.[trtllm]' "
                            f"on a machine with an NVIDIA GPU and driver")
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    report_path = log_path.with_suffix(".json")
    report_path.unlink(missing_ok=True)  # a report left by an earlier run must not pass for this one's
    with tempfile.TemporaryDirectory(prefix="trtllm-bench-") as tmp:
        dataset = Path(tmp) / "dataset.jsonl"
        dataset.write_text("".join(line + "\n" for line in dataset_lines(requests)), encoding="utf-8")
        argv = command(Path(model_dir).resolve(), dataset, report_path, model=model, point=point, tp=tp, pp=pp,
                       num_requests=len(requests), warmup=warmup, backend=backend,
                       engine_dir=Path(engine_dir).resolve() if engine_dir is not None else None, options=options,
                       streaming=streaming, executable=found)
        # Run in the empty temporary directory: trtllm-bench rejects a --model name that is an existing path.
        code, last = _stream(argv, log_path, Path(tmp))
    if code != 0:
        raise PipelineError(f"trtllm-bench failed at {point.label} (exit code {code}): {last or 'no output'} "
                            f"(full output in {log_path})")
    if not report_path.is_file():
        raise PipelineError(f"{report_path}: trtllm-bench exited 0 but wrote no report (full output in {log_path})")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{report_path}: not valid JSON ({e.msg}); see {log_path}") from None
    if not isinstance(report, dict):
        raise PipelineError(f"{report_path}: expected a JSON object, got {type(report).__name__}")
    return import_report(report, percentiles, streaming=streaming, path=report_path)


# --- every load point ---------------------------------------------------------------------------------------------


def expressible(points: Iterable[LoadPoint]) -> tuple[list[LoadPoint], dict[str, str]]:
    """(points trtllm-bench can send, {point key: why not} for the others)."""
    ok, skipped = [], {}
    for point in points:
        try:
            bench_concurrency(point)
            ok.append(point)
        except PipelineError as e:
            skipped[point.key] = str(e)
    return ok, skipped


def _checkpoint_dtype(weights_dir: Path) -> str | None:
    config = json.loads((Path(weights_dir) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def run_all(cfg, weights_dir: Path, output: Path, *, engine_dir: Path | None = None,
            executable: str = "trtllm-bench") -> dict[str, Any]:
    """trtllm-bench at every load point of the serve stage it can express, on the serve stage's requests ->
    {"source", "settings", "points"} written atomically to `output`; logs and raw reports in output's stem dir."""
    s = cfg.serving
    points, skipped = expressible(load_points(s.request_rates, s.concurrencies))
    if not points:
        raise PipelineError(f"serving.request_rates={list(s.request_rates)}: trtllm-bench can send none of these "
                            f"open-loop rates and serving.concurrencies is empty; add inf or a concurrency")
    backend = "pytorch" if engine_dir is None else "tensorrt"
    if engine_dir is not None and not (Path(engine_dir) / "config.json").is_file():
        raise PipelineError(f"{Path(engine_dir) / 'config.json'}: not found; --engine-dir takes a trtllm-build "
                            f"engine directory (dvc repro build_trtllm_engine makes artifacts/trtllm_engine)")
    requests, warmup = serve_requests(cfg, weights_dir)
    options = runtime_options(cfg, requests + warmup, engine_flow=engine_dir is not None)
    model = cfg.model.hub_id or cfg.model.name
    logs = Path(output).with_suffix("")
    rows = []
    for point in points:
        imported = run(requests, weights_dir, model=model, point=point, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                       warmup=len(warmup), backend=backend, options=options, percentiles=s.percentiles,
                       log_path=logs / f"{point.key}.log", engine_dir=engine_dir, executable=executable)
        rows.append({"backend": PROJECT_BACKEND[backend], "precision": cfg.precision.name, "tp": cfg.parallel.tp,
                     "pp": cfg.parallel.pp, "point": point.key, "load": point.kind,
                     "request_rate": point.value if point.kind == "rate" else None,
                     "concurrency": int(point.value) if point.kind == "concurrency" else None, **imported})
    dtype = _checkpoint_dtype(weights_dir) if engine_dir is None else None
    differences = [f"warm-up: {len(warmup)} requests drawn at random from the dataset (trtllm-bench "
                   f"generate_warmup_dataset), the serve stage sends its first {len(warmup)}"]
    if backend == "pytorch":
        differences.append(f"dtype: trtllm-bench has no dtype option and runs the checkpoint's ({dtype}); the serve "
                           f"stage's tensorrt-llm backend runs precision.name={cfg.precision.name}")
    if options["enable_block_reuse"]:
        differences.append("KV block reuse: trtllm-bench always turns it off; trtllm.enable_block_reuse is true")
    settings = {
        "trtllm_bench_backend": backend, "model": model, "model_path": str(weights_dir),
        "engine_dir": None if engine_dir is None else str(engine_dir), "num_requests": len(requests),
        "warmup_requests": len(warmup), "streaming": True, "eos": "disabled (--eos_id -1)",
        "kv_cache_free_gpu_mem_fraction": options["free_gpu_memory_fraction"],
        "max_batch_size": options["max_batch_size"], "max_num_tokens": options["max_num_tokens"],
        "percentile_method": PERCENTILE_METHOD, "serving": cfg.to_dict()["serving"],
        "skipped": skipped, "differences": differences, "logs": str(logs),
    }
    summary = {"source": SOURCE, "settings": settings, "points": rows}
    artifacts.atomic_write_json(Path(output), summary)
    return summary

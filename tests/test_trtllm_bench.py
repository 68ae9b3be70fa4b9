"""trtllm-bench on the serve stage's requests (pipeline/trtllm_bench.py): its dataset, its command line,
its report under the serving metric names, a run through a stand-in executable, and the CLI on this machine."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts, requirements
from pipeline.__main__ import main
from pipeline import trtllm_bench
from pipeline.benchmark import workload
from pipeline.benchmark.workload import LoadPoint
from pipeline.errors import PipelineError

OPTIONS = {"free_gpu_memory_fraction": 0.85, "max_batch_size": 8, "max_num_tokens": 256}
INF = LoadPoint("rate", math.inf)

# A report shaped exactly as ReportUtility.get_statistics_dict() writes it with --streaming (NVIDIA/TensorRT-LLM
# tensorrt_llm/bench/dataclasses/reporting.py @02499765: engine, machine, world_info, request_info, performance,
# streaming_metrics, dataset; percentile dicts are PercentileStats dumps, in ms: minimum, maximum, average, p50,
# p90, p95, p99). Numbers: 64 requests of 128 + 128 tokens in 10 s.
PERCENTILES_MS = {"minimum": 900.0, "maximum": 2100.0, "average": 1500.0, "p50": 1490.0, "p90": 1900.0,
                  "p95": 2000.0, "p99": 2090.0}
SAMPLE = {
    "engine": {"model": "meta-llama/Meta-Llama-3-8B", "model_path": "/w/artifacts/weights", "engine_dir": "None",
               "version": "1.2.0", "backend": "Pytorch", "dtype": "bfloat16", "kv_cache_dtype": None,
               "quantization": None},
    "machine": {"name": "NVIDIA H100 80GB HBM3", "memory.total": 79.1, "clocks.mem": 2.619},
    "world_info": {"tp_size": 1, "pp_size": 1, "ep_size": None, "world_size": 1, "max_batch_size": 8,
                   "max_num_tokens": 256, "scheduling_policy": "GUARANTEED_NO_EVICT", "kv_cache_percentage": 0.85,
                   "issue_rate": 1.2e5},
    "request_info": {"num_requests": 64, "avg_num_concurrent_requests": 9.6, "avg_input_length": 128.0,
                     "avg_output_length": 128.0},
    "performance": {"total_latency_ms": 10000.0, "avg_request_latency_ms": 1500.0, "request_throughput_req_s": 6.4,
                    "system_output_throughput_tok_s": 819.2, "system_total_throughput_tok_s": 1638.4,
                    "output_throughput_per_user_tok_s": 85.3, "output_throughput_per_gpu_tok_s": 819.2,
                    "request_latency_percentiles_ms": dict(PERCENTILES_MS)},
    "streaming_metrics": {
        "token_output_speed_tok_s": 90.1, "avg_ttft_ms": 120.0, "avg_tpot_ms": 10.9,
        "tpot_percentiles": {"minimum": 8.0, "maximum": 14.0, "average": 10.9, "p50": 10.8, "p90": 12.5,
                             "p95": 13.0, "p99": 13.9},
        "ttft_percentiles": {"minimum": 40.0, "maximum": 400.0, "average": 120.0, "p50": 110.0, "p90": 250.0,
                             "p95": 300.0, "p99": 390.0},
        "gen_tps_percentiles": {"minimum": 71.0, "maximum": 125.0, "average": 92.0, "p50": 92.5, "p90": 110.0,
                                "p95": 118.0, "p99": 124.0}},
    "dataset": {"isl_stats": {}, "osl_stats": {}, "seq_len_stats": {}, "num_requests": 64, "dataset_path": "/t/d",
                "max_isl": 128, "max_osl": 128, "max_sequence_length": 256, "avg_isl": 128, "avg_osl": 128,
                "avg_sequence_length": 256},
}


def _flags(argv: list[str]) -> dict[str, str | bool]:
    """--flag value pairs (a flag followed by another flag is a switch: True)."""
    out: dict[str, str | bool] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = True if nxt is None or nxt.startswith("--") else nxt
    return out


# --- 1. the dataset is the serve stage's requests -------------------------------------------------------------------


def test_dataset_lines_are_the_serve_stages_requests(default_cfg, tiny_model_dir):
    # Exactly as stages/serve.py builds them: the weights manifest's vocabulary, workload.build_requests.
    vocab = int(artifacts.verify_manifest(tiny_model_dir)["shape"]["vocab_size"])
    serve, serve_warmup = workload.build_requests(default_cfg.serving, vocab, tiny_model_dir)
    requests, warmup = trtllm_bench.serve_requests(default_cfg, tiny_model_dir)
    assert (requests, warmup) == (serve, serve_warmup)
    assert len({len(r.prompt) for r in serve}) > 1  # the default range_ratio varies lengths: a real round trip
    lines = trtllm_bench.dataset_lines(requests)
    assert len(lines) == default_cfg.serving.num_requests
    for line, r in zip(lines, serve):
        assert "\n" not in line  # one request a line, as data.py reads it
        row = json.loads(line)
        assert set(row) == {"task_id", "input_ids", "output_tokens"}  # the keys bench/utils/data.py reads
        assert row["task_id"] == r.id and row["input_ids"] == list(r.prompt) and row["output_tokens"] == r.max_new_tokens


# --- 2. the command line ------------------------------------------------------------------------------------------


def _command(**kw):
    args = dict(model="meta-llama/Meta-Llama-3-8B", point=INF, tp=2, pp=1, num_requests=24, warmup=4,
                backend="pytorch", options=OPTIONS)
    args.update(kw)
    return trtllm_bench.command(Path("/w/weights"), Path("/t/data.jsonl"), Path("/t/report.json"), **args)


def test_command_pytorch_backend_flags():
    argv = _command()
    assert argv[:6] == ["trtllm-bench", "--model", "meta-llama/Meta-Llama-3-8B", "--model_path", "/w/weights",
                        "throughput"]  # global options before the subcommand
    flags = _flags(argv[6:])
    assert flags == {"--dataset": "/t/data.jsonl", "--backend": "pytorch", "--tp": "2", "--pp": "1",
                     "--concurrency": "-1", "--num_requests": "24", "--warmup": "4",
                     "--kv_cache_free_gpu_mem_fraction": "0.85", "--max_batch_size": "8", "--max_num_tokens": "256",
                     "--eos_id": "-1", "--report_json": "/t/report.json", "--streaming": True}


def test_command_engine_backend_reads_the_engine_not_tp_pp():
    flags = _flags(_command(backend="tensorrt", engine_dir=Path("/e/engine"), executable="/opt/bin/trtllm-bench"))
    assert flags["--backend"] == "tensorrt" and flags["--engine_dir"] == "/e/engine"
    assert "--tp" not in flags and "--pp" not in flags  # the engine's config.json mapping decides
    assert _command(backend="tensorrt", engine_dir=Path("/e"), executable="/opt/bin/trtllm-bench")[0] == \
        "/opt/bin/trtllm-bench"


def test_command_maps_load_points_to_concurrency():
    assert _flags(_command(point=INF))["--concurrency"] == "-1"
    assert _flags(_command(point=LoadPoint("concurrency", 4)))["--concurrency"] == "4"
    assert "--streaming" not in _command(streaming=False)


def test_command_refuses_a_finite_rate_in_one_line():
    with pytest.raises(PipelineError) as e:
        _command(point=LoadPoint("rate", 16.0))
    msg = str(e.value)
    assert "serving.request_rates" in msg and "16 req/s" in msg and "\n" not in msg


def test_command_refuses_mismatched_backend_and_engine():
    with pytest.raises(PipelineError, match="engine directory"):
        _command(backend="tensorrt")
    with pytest.raises(PipelineError, match="engine directory"):
        _command(engine_dir=Path("/e"))
    with pytest.raises(PipelineError, match="_autodeploy"):
        _command(backend="_autodeploy")


# --- 3. the report under our names ---------------------------------------------------------------------------------


def test_import_report_maps_to_serving_metric_names():
    m = trtllm_bench.import_report(SAMPLE, [50, 90, 95, 99], path="r.json")
    assert m["source"] == "trtllm-bench" and m["trtllm_version"] == "1.2.0"
    assert "nearest rank" in m["percentile_method"]
    assert (m["completed"], m["failed"], m["duration_s"]) == (64, 0, 10.0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (8192, 8192)
    assert (m["request_throughput"], m["output_token_throughput"], m["total_token_throughput"]) == (6.4, 819.2, 1638.4)
    assert m["mean_concurrency"] == 9.6
    assert (m["ttft_ms_mean"], m["ttft_ms_median"], m["ttft_ms_p90"], m["ttft_ms_p99"]) == (120.0, 110.0, 250.0, 390.0)
    assert (m["tpot_ms_mean"], m["tpot_ms_p50"], m["tpot_ms_p95"]) == (10.9, 10.8, 13.0)
    assert (m["e2el_ms_mean"], m["e2el_ms_median"], m["e2el_ms_p99"]) == (1500.0, 1490.0, 2090.0)
    # What it cannot report is said, never filled in.
    assert not any(k.startswith("itl_ms") or k.endswith("_std") or k.startswith("goodput") for k in m)
    assert {"itl_ms_*", "goodput", "*_std"} <= set(m["absent"])


def test_import_report_percentiles_it_does_not_compute_are_absent():
    m = trtllm_bench.import_report(SAMPLE, [50, 75])
    assert "ttft_ms_p75" not in m and "ttft_ms_p75" in m["absent"] and m["ttft_ms_p50"] == 110.0


def test_import_report_without_streaming_has_no_ttft_or_tpot():
    report = {k: v for k, v in SAMPLE.items() if k != "streaming_metrics"}
    m = trtllm_bench.import_report(report, [99], streaming=False)
    assert "ttft_ms_p99" not in m and "--streaming" in m["absent"]["ttft_ms"]
    assert m["e2el_ms_p99"] == 2090.0


@pytest.mark.parametrize("section, key", [("performance", "system_output_throughput_tok_s"),
                                          ("request_info", "num_requests"),
                                          ("streaming_metrics", "ttft_percentiles")])
def test_import_report_names_a_missing_key_and_the_file(section, key):
    report = copy.deepcopy(SAMPLE)
    del report[section][key]
    with pytest.raises(PipelineError) as e:
        trtllm_bench.import_report(report, [50, 99], path="metrics/trtllm_bench/rate_inf.json")
    msg = str(e.value)
    assert f"no {section}.{key}" in msg and "metrics/trtllm_bench/rate_inf.json" in msg and "\n" not in msg


def test_import_report_names_a_missing_percentile_and_a_non_number():
    report = copy.deepcopy(SAMPLE)
    del report["streaming_metrics"]["tpot_percentiles"]["p90"]
    with pytest.raises(PipelineError, match=r"no streaming_metrics\.tpot_percentiles\.p90"):
        trtllm_bench.import_report(report, [90])
    report = copy.deepcopy(SAMPLE)
    report["performance"]["request_throughput_req_s"] = "fast"
    with pytest.raises(PipelineError, match="request_throughput_req_s is 'fast'"):
        trtllm_bench.import_report(report, [90])


# --- 4. a run through a stand-in executable --------------------------------------------------------------------------

FAKE = '''#!{python}
"""Stands in for trtllm-bench: reads its --dataset as data.py does, writes a --report_json of the real shape."""
import json, sys
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
with open({argv_log!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
rows = [json.loads(line) for line in open(flag("--dataset"))]
print("[TRT-LLM] [I] Preparing to run throughput benchmark...")
if {fail}:
    print("RuntimeError: Engine supports a max sequence of 2048.", file=sys.stderr)
    sys.exit(3)
n = len(rows)
isl = sum(len(r["input_ids"]) for r in rows) / n
osl = sum(r["output_tokens"] for r in rows) / n
pct = lambda base: {{"minimum": base, "maximum": 3 * base, "average": 2 * base, "p50": 2 * base,
                    "p90": 2.5 * base, "p95": 2.75 * base, "p99": 2.9 * base}}
report = {{
    "engine": {{"model": argv[argv.index("--model") + 1], "version": "1.1.0", "backend": "Pytorch"}},
    "world_info": {{"tp_size": int(flag("--tp")), "pp_size": int(flag("--pp"))}},
    "request_info": {{"num_requests": n, "avg_num_concurrent_requests": 3.5, "avg_input_length": isl,
                      "avg_output_length": osl}},
    "performance": {{"total_latency_ms": 2000.0, "avg_request_latency_ms": 200.0,
                     "request_throughput_req_s": n / 2.0, "system_output_throughput_tok_s": n * osl / 2.0,
                     "system_total_throughput_tok_s": n * (isl + osl) / 2.0,
                     "request_latency_percentiles_ms": pct(100.0)}},
    "streaming_metrics": {{"avg_ttft_ms": 20.0, "avg_tpot_ms": 5.0, "ttft_percentiles": pct(10.0),
                           "tpot_percentiles": pct(2.5)}},
}}
json.dump(report, open(flag("--report_json"), "w"), indent=4)
print("[TRT-LLM] [I] Benchmark done. Reporting results...")
'''


def _fake(tmp_path: Path, fail: bool = False) -> tuple[Path, Path]:
    exe, argv_log = tmp_path / "fake-trtllm-bench", tmp_path / "argv.jsonl"
    exe.write_text(FAKE.format(python=sys.executable, argv_log=str(argv_log), fail=fail))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe, argv_log


def _requests():
    return workload.random_requests(10, 16, 8, 0.25, 512, seed=3)


def _run(exe: Path, tmp_path: Path, **kw):
    args = dict(model="tiny", point=LoadPoint("concurrency", 4), tp=1, pp=1, warmup=2, backend="pytorch",
                options=OPTIONS, percentiles=[50, 99], log_path=tmp_path / "logs" / "concurrency_4.log",
                executable=str(exe))
    args.update(kw)
    return trtllm_bench.run(_requests(), tmp_path / "weights", **args)


def test_run_feeds_the_dataset_and_imports_the_report(tmp_path):
    exe, argv_log = _fake(tmp_path)
    m = _run(exe, tmp_path)
    reqs = _requests()
    assert m["completed"] == 10 and m["trtllm_version"] == "1.1.0"
    # the stand-in computed these from the dataset it read: every request, every token id
    assert m["total_input_tokens"] == sum(len(r.prompt) for r in reqs)
    assert m["total_output_tokens"] == sum(r.max_new_tokens for r in reqs)
    assert (m["ttft_ms_p99"], m["tpot_ms_median"], m["e2el_ms_mean"]) == (29.0, 5.0, 200.0)
    argv = json.loads(argv_log.read_text().splitlines()[0])
    assert _flags(argv)["--concurrency"] == "4" and _flags(argv)["--num_requests"] == "10"
    log = (tmp_path / "logs" / "concurrency_4.log").read_text()
    assert log.startswith("$ ") and "Benchmark done" in log  # the command and its whole output are kept
    assert json.loads((tmp_path / "logs" / "concurrency_4.json").read_text())["request_info"]["num_requests"] == 10


def test_run_failure_is_one_line_with_the_last_line_and_the_log(tmp_path, capsys):
    exe, _ = _fake(tmp_path, fail=True)
    with pytest.raises(PipelineError) as e:
        _run(exe, tmp_path)
    msg, log = str(e.value), tmp_path / "logs" / "concurrency_4.log"
    assert "\n" not in msg and "exit code 3" in msg
    assert "RuntimeError: Engine supports a max sequence of 2048." in msg and str(log) in msg
    assert "RuntimeError" in log.read_text()  # the log is kept
    assert "Preparing to run" in capsys.readouterr().out  # and the output reached the console


def test_run_without_trtllm_bench_on_path(tmp_path):
    with pytest.raises(PipelineError, match=r"not on PATH; it comes with tensorrt-llm: pip install -e '\.\[trtllm\]'"):
        _run(Path("trtllm-bench-not-installed-here"), tmp_path)


def test_run_all_runs_the_points_it_can_express(default_cfg, tiny_model_dir, tmp_path):
    exe, argv_log = _fake(tmp_path)
    out = tmp_path / "metrics" / "trtllm_bench.json"
    summary = trtllm_bench.run_all(default_cfg, tiny_model_dir, out, executable=str(exe))
    s = default_cfg.serving
    expressible = [p.key for p in workload.load_points(s.request_rates, s.concurrencies)
                   if p.kind == "concurrency" or math.isinf(p.value)]
    assert [row["point"] for row in summary["points"]] == expressible
    assert set(summary["settings"]["skipped"]) == {f"rate_{r:g}" for r in s.request_rates if not math.isinf(r)}
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary, default=str))
    row = summary["points"][0]
    assert row["backend"] == "tensorrt-llm" and row["source"] == "trtllm-bench"
    assert row["completed"] == s.num_requests
    # the serve stage's caps: trtllm.max_batch_size capped by serving.max_num_seqs, as its backend does
    argv = json.loads(argv_log.read_text().splitlines()[0])
    assert _flags(argv)["--max_batch_size"] == str(min(default_cfg.trtllm.max_batch_size, s.max_num_seqs))
    assert _flags(argv)["--warmup"] == str(s.warmup_requests)


# --- 5. the CLI on this machine ------------------------------------------------------------------------------------

no_trtllm = pytest.mark.skipif(requirements.probe().packages.get("tensorrt_llm") is not None,
                               reason="describes a machine without tensorrt_llm")


@no_trtllm
def test_cli_fails_in_one_line_without_tensorrt_llm_and_writes_nothing(raw, tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["trtllm-bench", "--params", str(params), "--output", "out/trtllm_bench.json"])
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert rc == 1
    assert len(text.splitlines()) == 1, text
    assert "trtllm-bench cannot run here: tensorrt_llm is not installed" in text
    assert "pip install -e '.[trtllm]'" in text
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]  # nothing written

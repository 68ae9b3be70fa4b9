"""`python -m pipeline doctor`: every stage and backend, whether it can run here and why not, on this machine
(CPU, no TensorRT) and on hand-built environments (GPUs, TensorRT and TensorRT-LLM versions)."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import config, doctor, paths, requirements
from pipeline.__main__ import main
from pipeline.backends.registry import BACKENDS
from pipeline.benchmark import machine
from pipeline.compose import compose_params
from pipeline.errors import PipelineError
from pipeline.requirements import GIB, STAGES, Environment, Gpu
from tests.conftest import ROOT

CONF = ROOT / "conf"
CORE = {"torch": "2.11.0", "transformers": "5.0.0", "onnx": "1.19.0", "onnxscript": "0.5.0",
        "onnxruntime": "1.23.0", "matplotlib": "3.10.0"}
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", 80 * GIB, (9, 0))
A100 = Gpu(0, "NVIDIA A100-SXM4-80GB", 80 * GIB, (8, 0))
RTX_24 = Gpu(0, "NVIDIA GeForce RTX 4090", 24 * GIB, (8, 9))

HERE = requirements.probe()
cpu_machine = pytest.mark.skipif(bool(HERE.gpus) or HERE.packages.get("tensorrt") is not None,
                                 reason="describes a machine without a GPU and without TensorRT")


def fake_env(gpus=(), tensorrt=None, tensorrt_llm=None, trtllm_build=None) -> Environment:
    return Environment({**CORE, "tensorrt": tensorrt, "tensorrt_llm": tensorrt_llm}, tuple(gpus),
                       {"trtllm-build": trtllm_build}, "" if gpus else "torch is a CPU build")


def cfg_of(*overrides: str) -> config.PipelineConfig:
    return config.from_dict(compose_params(CONF, list(overrides)))


def run(cfg, env, weights_dir=ROOT / "no-weights-here") -> doctor.Report:
    return doctor.doctor(cfg, env, weights_dir=weights_dir, dvc_yaml=ROOT / "dvc.yaml")


def stage(report, name):
    return next(r for r in report.stages if r.stage == name)


def backend(report, name):
    return next(r for r in report.backends if r.backend == name)


def package(report, module):
    return next(r for r in report.packages if r.module == module)


# --- this machine, the repository's params.yaml ---------------------------------------------------------------

@cpu_machine
def test_this_machine_with_the_repository_params():
    report = doctor.doctor(config.load(ROOT / paths.PARAMS), weights_dir=ROOT / paths.WEIGHTS_DIR,
                           dvc_yaml=ROOT / "dvc.yaml")
    assert package(report, "tensorrt").version is None and package(report, "tensorrt").extra == "tensorrt"
    assert "pip install -e '.[tensorrt]'" in package(report, "tensorrt").problem
    assert package(report, "tensorrt_llm").version is None and package(report, "tensorrt_llm").extra == "trtllm"
    assert "pip install -e '.[trtllm]'" in package(report, "tensorrt_llm").problem
    assert package(report, "torch").version == HERE.packages["torch"] and package(report, "torch").problem == ""
    assert report.gpus == [] and report.no_gpu_reason == HERE.no_gpu_reason != ""

    engine, trtllm_engine = stage(report, "build_engine"), stage(report, "build_trtllm_engine")
    assert engine.status == trtllm_engine.status == doctor.NOT_REQUESTED
    assert not engine.runnable and "tensorrt is not installed: pip install -e '.[tensorrt]'" in engine.reason
    assert not trtllm_engine.runnable and "tensorrt_llm is not installed" in trtllm_engine.reason
    for name in ("weights", "export_onnx", "export_onnx_half", "calibrate", "evaluate", "verify_parallel",
                 "benchmark", "serve", "report"):
        assert stage(report, name).status == doctor.OK, stage(report, name)

    for name in ("tensorrt", "tensorrt-llm", "tensorrt-llm-engine"):
        row = backend(report, name)
        assert row.status == doctor.NOT_REQUESTED and not row.runnable and "needs hardware=cuda" in row.reason
    assert "tensorrt is not installed" in backend(report, "tensorrt").reason
    assert "tensorrt_llm is not installed" in backend(report, "tensorrt-llm-engine").reason
    for name in ("torch", "torch-compiled", "onnxruntime"):
        row = backend(report, name)
        assert (row.status, row.runnable, row.reason) == (doctor.OK, True, ""), row
        assert row.benchmark


def test_one_row_per_stage_in_dvc_yaml_order_and_per_backend():
    report = run(cfg_of(), fake_env())
    listed = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    names = [r.stage for r in report.stages]
    assert sorted(names) == sorted(STAGES)
    assert [n for n in names if n in listed] == [s for s in listed if s in STAGES]
    assert [r.backend for r in report.backends] == list(BACKENDS)
    assert [p.module for p in report.packages] == list(dict.fromkeys(p.module for p in requirements.PACKAGES.values()))


@cpu_machine
def test_cli_json(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    stages = {r["stage"]: r for r in data["stages"]}
    backends = {r["backend"]: r for r in data["backends"]}
    packages = {r["module"]: r for r in data["packages"]}
    assert set(stages) == set(STAGES) and set(backends) == set(BACKENDS)
    assert stages["build_engine"]["status"] == stages["build_trtllm_engine"]["status"] == "not requested"
    assert packages["tensorrt"]["version"] is None and packages["tensorrt"]["extra"] == "tensorrt"
    assert packages["tensorrt_llm"]["version"] is None and packages["tensorrt_llm"]["extra"] == "trtllm"
    assert not any(backends[n]["runnable"] for n in ("tensorrt", "tensorrt-llm", "tensorrt-llm-engine"))
    assert all(backends[n]["status"] == "ok" for n in ("torch", "torch-compiled", "onnxruntime"))
    assert data["gpus"] == [] and data["no_gpu_reason"] == HERE.no_gpu_reason
    assert data["python"].count(".") == 2


@cpu_machine
def test_cli_plain(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(["doctor"]) == 0
    out = capsys.readouterr().err
    for text in ("build_engine", "build_trtllm_engine", "not requested", "tensorrt-llm-engine", "torch-compiled",
                 "onnxruntime", "not installed", ".[tensorrt]", ".[trtllm]", f"GPUs: none visible ({HERE.no_gpu_reason})"):
        assert text in out, text


def test_cli_params_missing_or_invalid(tmp_path, capsys):
    capsys.readouterr()
    assert main(["doctor", "--params", str(tmp_path / "absent.yaml")]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / paths.PARAMS).read_text()), "precision": {"name": "int4"}}))
    assert main(["doctor", "--params", str(bad), "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "precision.name" in err[1], err


# --- hand-built environments -----------------------------------------------------------------------------------

def test_tensorrt_too_old():
    cfg = cfg_of("hardware=cuda", "benchmark.backends=[torch,tensorrt]")
    report = run(cfg, fake_env([H100], tensorrt="10.8.0"))
    too_old = "tensorrt 10.8.0 is installed, >= 10.12 is needed (strongly typed networks"
    assert too_old in package(report, "tensorrt").problem
    assert backend(report, "tensorrt").status == doctor.CANNOT_RUN and too_old in backend(report, "tensorrt").reason
    assert stage(report, "build_engine").status == doctor.CANNOT_RUN and too_old in stage(report, "build_engine").reason
    # The benchmark launcher stops on a backend it was asked for and this machine cannot run.
    assert stage(report, "benchmark").status == doctor.CANNOT_RUN
    assert f"backend tensorrt cannot run here: {too_old}" in stage(report, "benchmark").reason
    assert backend(report, "torch").status == doctor.OK
    # 10.12 is enough.
    report = run(cfg, fake_env([H100], tensorrt="10.12.0"))
    assert stage(report, "build_engine").status == stage(report, "benchmark").status == doctor.OK


def test_the_reason_is_the_line_the_stage_fails_with():
    cfg = cfg_of("hardware=cuda", "benchmark.backends=[torch,tensorrt]")
    env = fake_env([H100], tensorrt="10.8.0")
    row = stage(run(cfg, env), "build_engine")
    target = machine.backend_target(cfg, BACKENDS["tensorrt"], doctor.model_shape(cfg, ROOT)[0])
    with pytest.raises(PipelineError) as failure:
        requirements.require("stage build_engine", STAGES["build_engine"], target, env)
    assert f"stage build_engine cannot run here: {row.reason} (" in str(failure.value)


def test_tensorrt_llm_1_3_runs_the_pytorch_flow_but_not_engines():
    cfg = cfg_of("hardware=cuda", "precision=bf16", "serving.backends=[torch-compiled,tensorrt-llm,tensorrt-llm-engine]")
    report = run(cfg, fake_env([H100], tensorrt_llm="1.3.0", trtllm_build="/usr/bin/trtllm-build"))
    removed = "tensorrt_llm 1.3.0 is installed, >= 1.0 and < 1.3 is needed (trtllm-build and the engine LLM API were removed"
    assert backend(report, "tensorrt-llm").status == doctor.OK
    engine = backend(report, "tensorrt-llm-engine")
    assert engine.status == doctor.CANNOT_RUN and engine.serving and removed in engine.reason
    assert stage(report, "build_trtllm_engine").status == doctor.CANNOT_RUN
    assert removed in stage(report, "build_trtllm_engine").reason
    assert removed in package(report, "tensorrt_llm").problem
    # 1.2 runs both, and builds the engine.
    report = run(cfg, fake_env([H100], tensorrt_llm="1.2.0", trtllm_build="/usr/bin/trtllm-build"))
    assert backend(report, "tensorrt-llm-engine").status == stage(report, "build_trtllm_engine").status == doctor.OK
    assert package(report, "tensorrt_llm").problem == ""


def test_fewer_gpus_than_tp_x_pp():
    cfg = cfg_of("hardware=cuda", "precision=bf16", "parallel=tp2", "serving.backends=[torch-compiled,tensorrt-llm]")
    report = run(cfg, fake_env([H100], tensorrt_llm="1.2.0"))
    for name in ("torch-tp", "tensorrt-llm"):
        row = backend(report, name)
        assert row.status == doctor.CANNOT_RUN and "2 GPUs are needed, 1 visible" in row.reason, row
    assert backend(report, "torch").status == backend(report, "torch-compiled").status == doctor.OK
    for name in ("verify_parallel", "benchmark", "serve"):
        assert stage(report, name).status == doctor.CANNOT_RUN and "2 GPUs are needed, 1 visible" in stage(report, name).reason
    report = run(cfg, fake_env([H100, Gpu(1, H100.name, H100.memory_bytes, H100.capability)], tensorrt_llm="1.2.0"))
    assert backend(report, "torch-tp").status == backend(report, "tensorrt-llm").status == doctor.OK


def test_fp8_needs_compute_capability_8_9():
    cfg = cfg_of("hardware=cuda", "precision=fp8")
    report = run(cfg, fake_env([A100]))
    row = backend(report, "torch-compiled")
    assert row.status == doctor.CANNOT_RUN and "precision fp8 needs compute capability >= 8.9" in row.reason
    assert "has 8.0" in row.reason
    assert stage(report, "benchmark").status == doctor.CANNOT_RUN
    # torch itself does not run fp8: the registry says so first.
    assert backend(report, "torch").reason.startswith("backend torch runs precisions")
    assert backend(run(cfg, fake_env([H100])), "torch-compiled").status == doctor.OK


def test_gpu_too_small_for_the_model_at_its_precision():
    report = run(cfg_of("hardware=cuda", "model=llama3-8b", "precision=fp32"), fake_env([RTX_24]))
    row = backend(report, "torch")
    assert row.status == doctor.CANNOT_RUN and "is too small for llama3-8b at fp32" in row.reason
    assert stage(report, "benchmark").status == doctor.CANNOT_RUN
    assert report.weight_bytes > 24 * GIB and "llama3-8b" in report.model
    report = run(cfg_of("hardware=cuda", "model=llama3-8b", "precision=bf16"), fake_env([H100]))
    assert backend(report, "torch").status == stage(report, "benchmark").status == doctor.OK
    assert 14 * GIB < report.weight_bytes < 17 * GIB


def test_cuda_without_a_gpu():
    report = run(cfg_of("hardware=cuda"), fake_env())
    no_gpu = "no CUDA GPU is visible (torch is a CPU build)"
    for name in ("torch", "torch-compiled", "onnxruntime", "torch-tp"):
        assert no_gpu in backend(report, name).reason and backend(report, name).status == doctor.CANNOT_RUN
    for name in ("verify_parallel", "benchmark", "serve"):
        assert stage(report, name).status == doctor.CANNOT_RUN and no_gpu in stage(report, name).reason
    assert stage(report, "weights").status == stage(report, "export_onnx").status == doctor.OK
    assert report.no_gpu_reason == "torch is a CPU build"


def test_model_size_unknown_until_the_weights_stage_ran(tmp_path):
    cfg = cfg_of("model=local", "model.local_dir=/models/any", "hardware=cuda")
    report = run(cfg, fake_env([RTX_24]), weights_dir=tmp_path)
    assert report.weight_bytes is None and "not known until the weights stage ran" in report.model
    assert backend(report, "torch").status == doctor.OK and backend(report, "torch").reason == doctor.UNKNOWN_SIZE
    # Once the weights stage wrote config.json, its shape sizes the check: an 8B model at fp32 exceeds 24 GiB.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192}))
    report = run(cfg, fake_env([RTX_24]), weights_dir=tmp_path)
    assert "config.json" in report.model and "too small" in backend(report, "torch").reason


def test_stages_not_requested_say_what_enabling_them_needs():
    cfg = cfg_of("export.half=null", "convert.formats=[ft]", "benchmark.backends=[torch]")
    report = run(cfg, fake_env())
    half, trtllm = stage(report, "export_onnx_half"), stage(report, "convert_trtllm")
    assert half.status == trtllm.status == doctor.NOT_REQUESTED and half.runnable and trtllm.runnable
    assert half.reason.startswith("export.half is null; enabling it needs torch, transformers")
    assert half.reason.endswith("which this machine has")
    assert trtllm.reason.startswith("convert.formats excludes trtllm")
    assert stage(report, "convert_ft").status == doctor.OK
    # Asked for on a CPU: the engine stage records that tensorrt does not run there, and what a build would need.
    report = run(cfg_of("benchmark.backends=[torch,tensorrt]"), fake_env())
    engine = stage(report, "build_engine")
    assert engine.status == doctor.NOT_REQUESTED and engine.reason.startswith("backend tensorrt runs on cuda, not cpu")
    assert "here tensorrt is not installed" in engine.reason


def test_benchmark_skips_backends_the_registry_rules_out_and_serve_may_have_none():
    report = run(cfg_of("precision=int8"), fake_env())
    bench = stage(report, "benchmark")
    assert bench.status == doctor.OK and bench.reason.startswith("runs onnxruntime; skips torch (backend torch runs")
    serve = stage(report, "serve")
    assert serve.status == doctor.CANNOT_RUN and serve.reason.startswith("no backend of serving.backends can run here")
    assert backend(report, "torch").status == doctor.CANNOT_RUN and backend(report, "onnxruntime").status == doctor.OK


def test_dvc_yaml_stages_are_the_requirements_stages():
    listed = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert listed == set(STAGES), (f"in dvc.yaml only: {sorted(listed - set(STAGES))}; in requirements.STAGES "
                                   f"only: {sorted(set(STAGES) - listed)}")

"""Engine builds without TensorRT: the `tensorrt` and `trtllm.build` params as builder settings and command lines
(data), the build driven through a fake TensorRT that enforces the real API's rules, and the stages on this
machine (TensorRT absent): a one-line error, exit 1, nothing left; not asked for, they record why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import artifacts, config
from pipeline.backends.registry import BACKENDS
from pipeline.compose import compose_params
from pipeline.engines import trt_build, trtllm_build
from pipeline.engines.profiles import covering_profile, input_shapes, uncovered_calls
from pipeline.errors import ConfigError, PipelineError
from tests import fake_trt_builder
from tests.conftest import ROOT
from tests.helpers import project_env

pytest_plugins = ["tests.fixtures_onnx"]

PROFILES = {"prefill": {"batch": [1, 2, 8], "seq": [1, 32, 256], "past": [0, 0, 0]},
            "decode": {"batch": [1, 2, 8], "seq": [1, 1, 1], "past": [1, 64, 511]}}


def _section(**changes):
    section = config.from_dict(compose_params(ROOT / "conf")).dataclass_dict("tensorrt")
    section.update(profiles=PROFILES, **changes)
    return section


def test_profiles_become_every_graph_inputs_min_opt_max():
    shapes = input_shapes(PROFILES["decode"], num_layers=2, kv_heads=2, head_dim=8)
    assert shapes["input_ids"] == ((1, 1), (2, 1), (8, 1)) == shapes["position_ids"]
    assert shapes["attention_mask"] == ((1, 2), (2, 65), (8, 512))  # past + seq
    assert shapes["past_key_values.1.value"] == ((1, 2, 1, 8), (2, 2, 64, 8), (8, 2, 511, 8))
    assert len(shapes) == 3 + 2 * 2


def test_a_call_takes_the_first_profile_holding_its_shapes():
    assert covering_profile(PROFILES, 4, 100, 0) == "prefill"
    assert covering_profile(PROFILES, 4, 1, 300) == "decode"
    assert covering_profile(PROFILES, 9, 1, 300) is None and covering_profile(PROFILES, 1, 2, 5) is None
    assert uncovered_calls(PROFILES, 8, 256, 257) is None
    assert uncovered_calls(PROFILES, 8, 256, 258) == (8, 1, 511 + 1)  # the last decode step outgrows past
    assert uncovered_calls(PROFILES, 8, 300, 2) == (8, 300, 0)


def test_builder_settings_as_data(tmp_path):
    s = trt_build.settings(_section(), tmp_path / "model.onnx", num_layers=2, kv_heads=2, head_dim=8,
                           timing_cache=tmp_path / "cache")
    assert s.workspace_bytes == 4 << 30 and s.optimization_level == 3
    assert list(s.profiles) == ["prefill", "decode"] and s.profiles["prefill"]["input_ids"] == ((1, 1), (2, 32), (8, 256))
    assert s.set_flags == () and s.clear_flags == () and s.profiling_verbosity == "DETAILED"
    assert s.hardware_compatibility == "NONE" and s.timing_cache == tmp_path / "cache"
    s = trt_build.settings(_section(refit=True, strip_plan=True, weight_streaming=True, tf32=False, timing_cache=False,
                                    workspace_gib=0.5, profiling_verbosity="none", max_aux_streams=2,
                                    hardware_compatibility="ampere_plus"),
                           tmp_path / "m.onnx", num_layers=2, kv_heads=2, head_dim=8, timing_cache=tmp_path / "cache")
    assert s.set_flags == ("REFIT", "STRIP_PLAN", "WEIGHT_STREAMING") and s.clear_flags == ("TF32",)
    assert s.workspace_bytes == 1 << 29 and s.timing_cache is None and s.max_aux_streams == 2
    assert (s.profiling_verbosity, s.hardware_compatibility) == ("NONE", "AMPERE_PLUS")


def test_timing_cache_is_keyed_by_gpu_and_tensorrt_version(tmp_path):
    assert trt_build.timing_cache_path(tmp_path, "NVIDIA H200", "10.13.0.35").name == "nvidia-h200-trt10.13.0.35.cache"


def test_every_precision_the_backend_runs_has_an_onnx_source():
    from pipeline.paths import ARTIFACTS

    assert set(trt_build.SOURCES) == set(BACKENDS["tensorrt"].precisions)
    assert all(kind in ARTIFACTS for kind in trt_build.SOURCES.values())


@pytest.mark.parametrize("version,flag_value", [("10.13.0", 1), ("11.1.0", 0)])
def test_build_drives_tensorrt_strongly_typed_with_profiles_cache_and_inspector(onnx_export, tmp_path, version,
                                                                                flag_value):
    trt = fake_trt_builder.make(version=version, strongly_typed_value=flag_value)
    onnx_dir, manifest = onnx_export
    n_layers = sum(1 for name in manifest["inputs"] if name.endswith(".key"))
    cache = tmp_path / "caches" / "gpu.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    s = trt_build.settings(_section(refit=True), onnx_dir / "model.onnx", num_layers=n_layers, kv_heads=2, head_dim=8,
                           timing_cache=cache)
    out = tmp_path / "engine"
    out.mkdir()
    metrics = trt_build.build(trt, s, out, tmp_path / "build.log")
    assert ("create_network", 1 << flag_value) in trt.calls
    (build,) = [c for c in trt.calls if c[0] == "build"]
    assert build[1] == ["REFIT", "TF32"] and build[2] == {"WORKSPACE": 4 << 30} and build[3] == 3
    assert build[4:] == ("DETAILED", "NONE")
    built = json.loads((out / trt_build.PLAN_FILE).read_bytes())
    assert built["profiles"] == {"profile0": PROFILES["prefill"], "profile1": PROFILES["decode"]}
    assert cache.read_bytes() == b"old+timed"  # read back in, written out with the new timings
    layers = json.loads((out / trt_build.LAYERS_FILE).read_text())["Layers"]
    assert metrics["engine_layers"] == len(layers) > 0 and metrics["layer_types"]["MatMul"] > 0
    assert metrics["timing_cache_bytes_before"] == 3 and metrics["plan_bytes"] > 0


def test_wrong_kv_shape_is_caught_by_the_graph_check(onnx_export, tmp_path):
    """The fake compares profile shapes with the graph: a head_dim the graph does not have cannot build."""
    onnx_dir, _ = onnx_export
    s = trt_build.settings(_section(), onnx_dir / "model.onnx", num_layers=4, kv_heads=2, head_dim=16, timing_cache=None)
    with pytest.raises(AssertionError, match="does not fit"):
        trt_build.build(fake_trt_builder.make(), s, tmp_path, tmp_path / "build.log")


def test_a_failed_build_names_its_log_and_the_log_keeps_the_reason(onnx_export, tmp_path):
    onnx_dir, _ = onnx_export
    s = trt_build.settings(_section(), onnx_dir / "model.onnx", num_layers=4, kv_heads=2, head_dim=8, timing_cache=None)
    log = tmp_path / "build.log"
    with pytest.raises(PipelineError, match="returned None.*build.log") as e:
        trt_build.build(fake_trt_builder.make(fail_build=True), s, tmp_path / "x", log)
    assert "\n" not in str(e.value)
    assert "[ERROR] out of memory while timing tactics" in log.read_text()


def test_parser_errors_name_the_node(onnx_export, tmp_path):
    onnx_dir, _ = onnx_export
    s = trt_build.settings(_section(), onnx_dir / "model.onnx", num_layers=4, kv_heads=2, head_dim=8, timing_cache=None)
    trt = fake_trt_builder.make(parser_errors=("Unsupported datatype", "second"))
    log = tmp_path / "build.log"
    with pytest.raises(PipelineError, match="node 'node_mul_3' \\(Mul\\): Unsupported datatype; every error is in"):
        trt_build.build(trt, s, tmp_path, log)
    assert log.read_text().count("ONNX parser:") == 2


def test_the_built_artifact_runs_in_the_tensorrt_backend(onnx_export, tmp_path, monkeypatch):
    """build_artifact's plan and manifest, loaded by the tensorrt backend (the runtime half of the stand-in runs the
    plan with onnxruntime): greedy tokens equal the onnxruntime backend's on the same graph."""
    import sys

    import torch

    from pipeline.backends.base import BackendInputs
    from pipeline.backends.onnxruntime import OnnxRuntimeBackend
    from pipeline.backends.tensorrt import TensorRTBackend

    trt = fake_trt_builder.make()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_dir, onnx_manifest = onnx_export
    shape = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 8}
    s = trt_build.settings(_section(), onnx_dir / "model.onnx", num_layers=4, kv_heads=2, head_dim=8, timing_cache=None)
    out = tmp_path / "trt_engine"
    out.mkdir()
    manifest = trt_build.build_artifact(trt, s, out, tmp_path / "build.log", precision="fp32", source=onnx_dir,
                                        source_manifest=onnx_manifest, shape=shape, profiles=PROFILES,
                                        strip_plan=False, gpu="test GPU", capability=(9, 0))
    assert manifest["kv_dtype"] == "float32" and list(manifest["profiles"]) == ["prefill", "decode"]
    ids = torch.tensor([[5, 9, 12, 3, 7], [1, 2, 3, 4, 5]])

    def greedy(backend):
        backend.load()
        tokens = [backend.prefill(ids)]
        tokens += [backend.decode(tokens[-1]) for _ in range(6)]
        return torch.stack(tokens, 1)

    ours = greedy(TensorRTBackend(BackendInputs("tensorrt", out, "fp32", "cpu")))
    reference = greedy(OnnxRuntimeBackend(BackendInputs("onnxruntime", onnx_dir, "fp32", "cpu")))
    assert torch.equal(ours, reference)


def test_an_fp16_engine_keeps_its_kv_cache_in_fp16(onnx_tiny_dir, tmp_path, monkeypatch):
    """From the half export: the manifest's kv_dtype is what the engine's past tensors are (the backend checks),
    and the KV cache the backend carries between steps is fp16."""
    import sys

    import torch

    from pipeline.backends.base import BackendInputs
    from pipeline.backends.tensorrt import TensorRTBackend
    from pipeline.export import export_half

    trt = fake_trt_builder.make()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    half = tmp_path / "onnx_half"
    half_manifest = export_half(onnx_tiny_dir, half, "fp16")
    s = trt_build.settings(_section(), half / "model.onnx", num_layers=4, kv_heads=2, head_dim=8, timing_cache=None)
    out = tmp_path / "trt_engine"
    out.mkdir()
    manifest = trt_build.build_artifact(trt, s, out, tmp_path / "build.log", precision="fp16", source=half,
                                        source_manifest=half_manifest, shape={"num_layers": 4, "num_kv_heads": 2,
                                                                              "head_dim": 8},
                                        profiles=PROFILES, strip_plan=False, gpu="test GPU", capability=(9, 0))
    assert manifest["kv_dtype"] == "float16"
    backend = TensorRTBackend(BackendInputs("tensorrt", out, "fp16", "cpu"))
    backend.load()
    backend.decode(backend.prefill(torch.tensor([[5, 9, 12]])))
    assert backend.past[0].dtype == torch.float16 and backend.past[0].shape == (1, 2, 4, 8)


def test_the_source_graph_must_carry_the_precision():
    trt_build.check_source({"dtype": "float32"}, Path("artifacts/onnx"), "fp32")
    trt_build.check_source({"precision": "bf16"}, Path("h"), "bf16")
    with pytest.raises(PipelineError, match="a fp16 graph, precision.name is bf16; set export.half=bf16"):
        trt_build.check_source({"precision": "fp16"}, Path("h"), "bf16")
    with pytest.raises(PipelineError, match="not exported \\(export.half is null\\); set export.half=fp16"):
        trt_build.check_source({"skipped": True, "reason": "export.half is null"}, Path("h"), "fp16")


def test_trtllm_build_command_as_data(tmp_path):
    build = config.from_dict(compose_params(ROOT / "conf")).dataclass_dict("trtllm")["build"]
    args = trtllm_build.command(build, Path("artifacts/trtllm"), tmp_path, world_size=4)
    assert args[:5] == ["trtllm-build", "--checkpoint_dir", "artifacts/trtllm", "--output_dir", str(tmp_path)]
    pairs = dict(zip(args[5::2], args[6::2]))
    assert pairs["--max_batch_size"] == "256" and pairs["--max_seq_len"] == "2048"
    assert pairs["--kv_cache_type"] == "paged" and pairs["--use_paged_context_fmha"] == "enable"
    assert pairs["--gemm_plugin"] == "auto" and pairs["--workers"] == "1"
    assert pairs["--output_timing_cache"] == str(tmp_path / "model.cache")
    assert dict(zip(*[iter(trtllm_build.command({**build, "workers": 8}, Path("c"), tmp_path, 2)[5:])] * 2))[
        "--workers"] == "2"  # never more workers than ranks


def test_trtllm_checkpoint_must_match_params():
    ok = {"tp": 2, "pp": 1, "dtype": "bf16"}
    trtllm_build.check_checkpoint(ok, Path("c"), "bf16", 2, 1)
    with pytest.raises(PipelineError, match="tp=2 pp=1, params.yaml asks tp=1 pp=1"):
        trtllm_build.check_checkpoint(ok, Path("c"), "bf16", 1, 1)
    with pytest.raises(PipelineError, match="converted as bf16, precision.name is fp16"):
        trtllm_build.check_checkpoint(ok, Path("c"), "fp16", 2, 1)
    with pytest.raises(PipelineError, match="add trtllm to convert.formats"):
        trtllm_build.check_checkpoint({"skipped": True, "reason": "r"}, Path("c"), "bf16", 2, 1)


def test_trtllm_build_failure_keeps_its_output(tmp_path):
    script = tmp_path / "fake-build"
    script.write_text("#!/bin/sh\necho building rank 0\necho 'RuntimeError: out of memory' >&2\nexit 3\n")
    script.chmod(0o755)
    log = tmp_path / "build.log"
    with pytest.raises(PipelineError, match="exit code 3\\): RuntimeError: out of memory"):
        trtllm_build.build([str(script)], log)
    assert "building rank 0" in log.read_text()
    with pytest.raises(PipelineError, match="not on PATH"):
        trtllm_build.build([str(tmp_path / "absent")], log)


# Config: what an engine cannot take is rejected before anything runs.

def _compose(*overrides):
    return compose_params(ROOT / "conf", list(overrides))


def test_profiles_must_cover_the_benchmark_and_serving_calls():
    _compose("benchmark.backends=[torch,tensorrt]", "hardware=cuda")
    with pytest.raises(ConfigError, match="tensorrt.profiles cover no call of batch 8, 1 new and 301 cached"):
        _compose("benchmark.backends=[torch,tensorrt]", "hardware=cuda", "benchmark.batch_sizes=[8]",
                 "benchmark.prompt_lengths=[250]", "benchmark.output_length=60", "tensorrt.profiles.decode.past=[1,64,300]")
    with pytest.raises(ConfigError, match="tensorrt.profiles cover no call of batch 16"):
        _compose("serving.backends=[tensorrt]", "hardware=cuda", "serving.max_num_seqs=16")
    with pytest.raises(ConfigError, match="tensorrt.profiles is empty"):
        _compose("benchmark.backends=[torch,tensorrt]", "hardware=cuda", "~tensorrt.profiles.prefill",
                 "~tensorrt.profiles.decode")
    _compose("~tensorrt.profiles.prefill", "~tensorrt.profiles.decode")  # not asked for: no profile needed


def test_profile_values_are_checked():
    with pytest.raises(ConfigError, match=r"tensorrt.profiles.decode.past must be \[min, opt, max\]"):
        _compose("tensorrt.profiles.decode.past=[5,1,9]")
    with pytest.raises(ConfigError, match="tensorrt.profiles.decode must give exactly batch, seq, past"):
        _compose("~tensorrt.profiles.decode.seq")
    with pytest.raises(ConfigError, match="tensorrt.strip_plan needs tensorrt.refit=true"):
        _compose("tensorrt.strip_plan=true")


def test_a_half_engine_needs_the_matching_half_export():
    _compose("benchmark.backends=[torch,tensorrt]", "hardware=cuda", "precision=fp16")
    with pytest.raises(ConfigError, match="export.half is fp16 but backend tensorrt builds precision.name=bf16"):
        _compose("benchmark.backends=[torch,tensorrt]", "hardware=cuda", "precision=bf16")


def test_serving_only_backends_are_refused_by_the_benchmark_stage():
    with pytest.raises(ConfigError, match="benchmark.backends\\[1\\] backend tensorrt-llm schedules requests itself"):
        _compose("benchmark.backends=[torch,tensorrt-llm]")
    _compose("serving.backends=[torch,tensorrt-llm]")


def test_trtllm_engine_must_hold_the_longest_request():
    with pytest.raises(ConfigError, match=r"trtllm.build.max_seq_len \(64\) is below the longest request"):
        _compose("serving.backends=[tensorrt-llm-engine]", "trtllm.build.max_seq_len=64", "trtllm.build.max_input_len=32")


# The stages on this machine (no TensorRT, no TensorRT-LLM, no GPU).

def _project(tmp_path, tiny_model_dir, *overrides) -> Path:
    from pipeline.compose import write_params

    shutil.copytree(tiny_model_dir, tmp_path / "artifacts" / "weights")
    write_params(_compose("tracking=off", *overrides), tmp_path / "params.yaml")
    return tmp_path


def _stage(name: str, project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, capture_output=True, text=True,
                          env=project_env(PYTHONPATH=str(ROOT)), timeout=300)


@pytest.mark.parametrize("stage,overrides,reason", [
    ("build_engine", ("benchmark.backends=[torch,tensorrt]", "hardware=cuda"),
     "stage build_engine cannot run here: tensorrt is not installed: pip install -e '.[tensorrt]'"),
    ("build_trtllm_engine", ("serving.backends=[tensorrt-llm-engine]", "hardware=cuda", "precision=bf16"),
     "stage build_trtllm_engine cannot run here: tensorrt_llm is not installed: pip install -e '.[trtllm]'"),
])
def test_asked_for_without_the_library_the_stage_fails_in_one_line_leaving_nothing(tmp_path, tiny_model_dir, stage,
                                                                                  overrides, reason):
    project = _project(tmp_path, tiny_model_dir, *overrides)
    proc = _stage(stage, project)
    assert proc.returncode == 1
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {reason}"), lines
    assert sorted(p.name for p in (project / "artifacts").iterdir()) == ["weights"]
    assert not (project / "metrics").exists()


@pytest.mark.parametrize("stage,out,why", [
    ("build_engine", "trt_engine", "no backend asks for it"),
    ("build_trtllm_engine", "trtllm_engine", "no backend asks for it"),
])
def test_not_asked_for_the_stage_records_why(tmp_path, tiny_model_dir, stage, out, why):
    project = _project(tmp_path, tiny_model_dir)
    proc = _stage(stage, project)
    assert proc.returncode == 0, proc.stderr
    manifest = artifacts.verify_manifest(project / "artifacts" / out)
    assert manifest["skipped"] is True and manifest["reason"].startswith(why)


def test_asked_for_on_a_cpu_config_the_engine_stage_records_the_registry_reason(tmp_path, tiny_model_dir):
    project = _project(tmp_path, tiny_model_dir, "benchmark.backends=[torch,tensorrt]")
    proc = _stage("build_engine", project)
    assert proc.returncode == 0, proc.stderr
    assert artifacts.read_manifest(project / "artifacts/trt_engine")["reason"] == \
        "backend tensorrt runs on cuda, not cpu"
    assert (project / "artifacts/trt_timing_cache/README.txt").is_file()  # the persisted DVC output exists

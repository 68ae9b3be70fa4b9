"""Fault class 1 of issue 19: integrity at every read. Every stage verifies the manifest (sizes and sha256) of
each artifact it reads before using it; a corrupted byte, a truncated file, a deleted or malformed manifest or a
planted unlisted file ends the stage in one line naming the file, exit code 1, with the project left exactly as
it was (no partial output, previous outputs untouched).

The artifacts are built once per module by the stages' library functions; each case runs the stage's main() in
a copy of that project (what `python -m stages.<name>` runs), and one case runs a real `python -m stages.*`."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import project_env

pytest_plugins = ["tests.fixtures_onnx"]

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
ENGINE_ASKED = {  # what makes each engine stage build (and so read the weights) rather than record a skip
    "build_engine": ("benchmark.backends=[torch,tensorrt]", "hardware=cuda"),
    "build_trtllm_engine": ("serving.backends=[tensorrt-llm-engine]", "hardware=cuda", "precision=bf16"),
}


def _params(project: Path, *overrides: str) -> None:
    from pipeline.compose import compose_params, write_params

    write_params(compose_params(ROOT / "conf", ["tracking=off", *overrides]), project / "params.yaml")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, onnx_export, default_cfg) -> Path:
    """A project with every artifact the default config reads, made by the stages' library code (the ONNX export
    shared with the other ONNX tests). The fp16 graph is a stand-in, the fp32 graph under an fp16 manifest: a
    second export costs ~20 s, and every case here must stop at its manifest before reading a byte of it."""
    from pipeline.calibrate import quantize
    from pipeline.convert import ft, skip, trtllm

    root = tmp_path_factory.mktemp("integrity") / "project"
    art = root / "artifacts"
    shutil.copytree(tiny_model_dir, art / "weights")
    shutil.copytree(onnx_export[0], art / "onnx")
    (art / "onnx_half").mkdir()
    shutil.copy2(art / "onnx" / "model.onnx", art / "onnx_half" / "model.onnx")
    artifacts.write_manifest(art / "onnx_half", kind="onnx-model", precision="fp16", dtype="float16")
    _params(root)
    weights = art / "weights"
    quantize(art / "onnx" / "model.onnx", weights, art / "onnx_int8", num_samples=2, seq_len=8)
    dtype = default_cfg.convert.resolved_dtype(default_cfg.precision)
    ft.convert(weights, art / "ft", tp=1, pp=1, dtype=dtype)
    trtllm.convert(weights, art / "trtllm", tp=1, pp=1, dtype=dtype)
    skip.write_skipped(art / "trt_engine", "tensorrt", "no backend asks for it", kind="trt-engine")
    skip.write_skipped(art / "trtllm_engine", "trtllm", "no backend asks for it", kind="trtllm-engine")
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    return root


@pytest.fixture
def project(built, tmp_path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(built, dst)
    return dst


def _largest(root: Path) -> Path:
    files = artifacts.read_manifest(root)["files"]
    return root / max(files, key=lambda e: (e["bytes"], e["path"]))["path"]


def corrupt(root: Path) -> Path:
    """Flip one byte in the middle of the artifact's largest file (same size, same name)."""
    path = _largest(root)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def truncate(root: Path) -> Path:
    path = _largest(root)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def delete_manifest(root: Path) -> Path:
    path = root / artifacts.MANIFEST
    path.unlink()
    return path


FAULTS = {"corrupt-byte": corrupt, "truncated": truncate, "no-manifest": delete_manifest}


def _tree(root: Path) -> dict[str, str]:
    """Every file of the project with its sha256 (the verify cache aside: it is the project's own scratch)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and artifacts.VERIFY_CACHE.name not in p.parts}


def _previous_outputs(project: Path, stage: str) -> None:
    """What an earlier run of `stage` left (its dvc.yaml outs), so the test can see the failure keep it."""
    for out in DVC[stage].get("outs", []):
        path = project / (next(iter(out)) if isinstance(out, dict) else out)
        if path.exists():
            continue
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"previous {stage} output\n")
        else:
            path.mkdir(parents=True)
            (path / "previous.txt").write_text(f"previous {stage} output\n")


def run_stage_main(stage: str, project: Path, monkeypatch, capsys) -> list[str]:
    """stages.<stage>.main() as `python -m stages.<stage>` runs it, in `project`: it must exit 1 leaving the
    project unchanged; returns the output lines."""
    from stages._main import run

    _previous_outputs(project, stage)
    before = _tree(project)
    monkeypatch.chdir(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(importlib.import_module(f"stages.{stage}").main)
    out = capsys.readouterr()
    assert exit_.value.code == 1
    assert _tree(project) == before, "the failed stage changed the project"
    return [line for line in (out.out + out.err).splitlines() if line.strip()]


def assert_one_error_line(lines: list[str], names: Path, project: Path) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert "Traceback" not in "\n".join(lines)
    assert str(names.relative_to(project)) in errors[0], errors[0]
    return errors[0]


# (stage, artifact it reads, params overrides) for every stage and artifact directory it reads on this machine.
READS = [
    ("export_onnx", "weights", ()),
    ("export_onnx_half", "weights", ()),
    ("calibrate", "onnx", ()), ("calibrate", "weights", ()),
    ("evaluate", "weights", ()), ("evaluate", "onnx", ()), ("evaluate", "onnx_int8", ()), ("evaluate", "onnx_half", ()),
    ("convert_ft", "weights", ()),
    ("convert_trtllm", "weights", ()),
    ("verify_parallel", "weights", ()), ("verify_parallel", "ft", ()), ("verify_parallel", "trtllm", ()),
    ("build_engine", "weights", ENGINE_ASKED["build_engine"]),
    ("build_trtllm_engine", "weights", ENGINE_ASKED["build_trtllm_engine"]),
    ("benchmark", "weights", ()), ("benchmark", "onnx", ()), ("benchmark", "trtllm", ()),
    ("benchmark", "onnx_int8", ("precision=int8",)),
    ("serve", "weights", ()),
]
# Artifact deps read only on a GPU machine (the engine stages stop at their requirement check first; only GPU
# backends load the engines) or by backends the default serving.backends leaves out; the same calls guard them
# (launcher.artifact_dir for every backend, build_engine's source, build_trtllm_engine's checkpoint).
GPU_ONLY = {("build_engine", "onnx"), ("build_engine", "onnx_half"), ("build_engine", "onnx_int8"),
            ("build_trtllm_engine", "trtllm"), *((stage, engine) for stage in ("benchmark", "serve")
                                                 for engine in ("trt_engine", "trtllm_engine")),
            ("serve", "onnx"), ("serve", "onnx_int8"), ("serve", "trtllm")}


def test_reads_cover_every_artifact_dependency_in_dvc_yaml():
    declared = {(stage, dep.removeprefix("artifacts/")) for stage, spec in DVC.items() for dep in spec.get("deps", [])
                if dep.startswith("artifacts/") and dep.count("/") == 1}
    assert declared - GPU_ONLY == {(stage, artifact) for stage, artifact, _ in READS}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("stage,artifact,overrides", READS, ids=[f"{s}-{a}" for s, a, _ in READS])
def test_a_damaged_input_stops_the_stage_in_one_line(project, monkeypatch, capsys, stage, artifact, overrides, fault):
    if overrides:
        _params(project, *overrides)
    damaged = FAULTS[fault](project / "artifacts" / artifact)
    lines = run_stage_main(stage, project, monkeypatch, capsys)
    assert_one_error_line(lines, damaged, project)


def test_the_report_reads_a_malformed_weights_manifest_as_one_line(project, monkeypatch, capsys):
    """The report reads only the weights' manifest (its one artifact dep): malformed, it is one line."""
    manifest = project / "artifacts" / "weights" / artifacts.MANIFEST
    manifest.write_text(json.dumps({"kind": "hf-model", "files": "model.safetensors"}))
    from pipeline import paths

    for path in (paths.BENCHMARK_METRICS, paths.BENCHMARK_CONDITIONS, paths.WEIGHTS_METRICS, paths.VERIFY_METRICS,
                 paths.EXPORT_METRICS, paths.ONNX_GRAPH, paths.CALIBRATE_METRICS, paths.EVALUATE_METRICS,
                 paths.SERVING_METRICS, paths.BENCHMARK_RUNS):  # the report's other inputs: present, never reached
        (project / path).parent.mkdir(exist_ok=True)
        (project / path).write_text("{}\n")
    lines = run_stage_main("report", project, monkeypatch, capsys)
    assert_one_error_line(lines, manifest, project)


@pytest.mark.parametrize("stage", ["benchmark", "serve", "verify_parallel"])
def test_a_weights_manifest_without_its_shape_is_one_line(project, monkeypatch, capsys, stage):
    """The stages that size their prompts from the manifest's shape.vocab_size."""
    manifest = project / "artifacts" / "weights" / artifacts.MANIFEST
    data = json.loads(manifest.read_text())
    del data["shape"]
    manifest.write_text(json.dumps(data))
    lines = run_stage_main(stage, project, monkeypatch, capsys)
    assert "shape.vocab_size" in assert_one_error_line(lines, manifest, project)


def test_a_planted_file_stops_the_stage(project, monkeypatch, capsys):
    """A file the manifest does not list (a pickle dropped beside the weights) is refused, not ignored."""
    planted = project / "artifacts" / "weights" / "pytorch_model.bin"
    planted.write_bytes(b"\x80\x04not a real pickle")
    lines = run_stage_main("convert_trtllm", project, monkeypatch, capsys)
    assert "not listed" in assert_one_error_line(lines, planted, project)


def test_stage_process_exits_1_with_one_line(project):
    """The real entry point: `python -m stages.evaluate` on a corrupted INT8 graph."""
    damaged = corrupt(project / "artifacts" / "onnx_int8")
    _previous_outputs(project, "evaluate")
    before = _tree(project)
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=project, capture_output=True, text=True,
                          env=project_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {damaged.relative_to(project)}: sha256 differs"), lines
    assert _tree(project) == before


# verify_manifest itself, on a small artifact: every malformed manifest is one PipelineError naming it.

@pytest.fixture
def small(tmp_path) -> Path:
    root = tmp_path / "art"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 10)
    (root / "sub" / "b.txt").write_text("b")
    artifacts.write_manifest(root, kind="test")
    return root


def _entry(**change):
    return {"path": "a.bin", "bytes": 10, "sha256": hashlib.sha256(b"a" * 10).hexdigest(), **change}


MALFORMED = {
    "not-json": b"{files: [",
    "not-utf8": b'{"files": [], "kind": "\xff\xfe"}',
    "a-list": json.dumps([_entry()]).encode(),
    "no-files": json.dumps({"kind": "test"}).encode(),
    "files-a-string": json.dumps({"files": "a.bin"}).encode(),
    "files-null": json.dumps({"files": None}).encode(),
    "entry-a-string": json.dumps({"files": ["a.bin"]}).encode(),
    "entry-without-path": json.dumps({"files": [{"bytes": 10, "sha256": "0" * 64}]}).encode(),
    "path-a-number": json.dumps({"files": [_entry(path=3)]}).encode(),
    "bytes-a-string": json.dumps({"files": [_entry(bytes="10")]}).encode(),
    "bytes-a-bool": json.dumps({"files": [_entry(bytes=True)]}).encode(),
    "bytes-negative": json.dumps({"files": [_entry(bytes=-1)]}).encode(),
    "sha256-not-hex": json.dumps({"files": [_entry(sha256="z" * 64)]}).encode(),
    "sha256-short": json.dumps({"files": [_entry(sha256="abc")]}).encode(),
    "path-parent": json.dumps({"files": [_entry(path="../outside.bin")]}).encode(),
    "path-parent-inside": json.dumps({"files": [_entry(path="sub/../../outside.bin")]}).encode(),
    "path-absolute": json.dumps({"files": [_entry(path="/etc/hostname")]}).encode(),
    "path-empty": json.dumps({"files": [_entry(path="")]}).encode(),
    "path-dot": json.dumps({"files": [_entry(path=".")]}).encode(),
    "path-backslash": json.dumps({"files": [_entry(path="..\\outside.bin")]}).encode(),
    "path-the-manifest": json.dumps({"files": [_entry(path="manifest.json")]}).encode(),
    "path-twice": json.dumps({"files": [_entry(), _entry()]}).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_one_pipeline_error(small, case):
    (small / artifacts.MANIFEST).write_bytes(MALFORMED[case])
    with pytest.raises(PipelineError) as e:
        artifacts.verify_manifest(small, cache_dir=None)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{small / artifacts.MANIFEST}: "), message


def test_an_escaping_path_is_refused_even_when_the_file_outside_matches(small):
    """'../x' naming a real file with the right size and hash: still refused, never read."""
    outside = small.parent / "outside.bin"
    outside.write_bytes(b"a" * 10)
    (small / artifacts.MANIFEST).write_text(json.dumps({"files": [_entry(path="../outside.bin")]}))
    with pytest.raises(PipelineError, match="outside"):
        artifacts.verify_manifest(small, cache_dir=None)


@pytest.mark.parametrize("planted", ["model.pkl", "sub/extra.bin", ".hidden"])
def test_a_file_not_listed_in_the_manifest_is_refused(small, planted):
    (small / planted).write_bytes(b"\x80\x04planted")
    with pytest.raises(PipelineError, match=f"^{small / planted}: not listed in {artifacts.MANIFEST}"):
        artifacts.verify_manifest(small, cache_dir=None)


def test_an_intact_artifact_and_a_skipped_one_verify(small, tmp_path):
    from pipeline.convert import skip

    assert [e["path"] for e in artifacts.verify_manifest(small, cache_dir=None)["files"]] == ["a.bin", "sub/b.txt"]
    assert artifacts.verify_manifest(skip.write_skipped(tmp_path / "s", "ft", "why") and tmp_path / "s")["skipped"]


def test_the_parallel_runner_loads_the_checkpoint_the_stage_verified(project, monkeypatch):
    """verify_parallel verifies artifacts/ft of the directory it runs in; torchrun's ranks run in the package's
    root (pipeline/runner/verify.py ROOT), so they must be handed that checkpoint by absolute path, or they load
    the one of whichever tree the package was installed from."""
    from pipeline.runner import verify

    seen = {}

    def fake_run(cmd, cwd, **kwargs):
        seen["checkpoint"] = (Path(cwd) / cmd[cmd.index("--checkpoint") + 1]).resolve()
        return subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.chdir(project)
    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    with pytest.raises(PipelineError):
        verify.run_parallel("ft", Path("artifacts/ft"), 1, 1, [[1, 2]], 1)
    assert seen["checkpoint"] == (project / "artifacts" / "ft").resolve()

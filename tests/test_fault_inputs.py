"""Fault class 4 of issue 19: no tracebacks for foreseeable faults. Truncated or malformed input files of every
kind the pipeline reads, text that is not UTF-8, a tokenizer that needs remote code, the hub offline or
unreachable, a full disk and denied permissions each end in exit code 1 and one line that names the file or
setting and what to do, with nothing half-written left behind.

Stage cases run the real `python -m stages.weights` (a few seconds each) in a bare project directory holding only
params.yaml; file-level readers (held-out text, calibration corpus, ShareGPT, report inputs) are called directly.
Disk-full and permission faults are injected below the pipeline by a sitecustomize on PYTHONPATH (FAULTS), so the
stage sees exactly the OSError the kernel would raise, also when the tests run as root (where chmod denies
nothing); a real chmod case runs when they do not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.benchmark.results import RUN_COLUMNS
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import free_port, project_env

# Loaded by every Python process started with this folder on PYTHONPATH. FAULT_DIR: the directory the fault hits;
# FAULT=ENOSPC: writes under it fail once FAULT_BUDGET bytes went in (open().write, also of os.fdopen, and
# os.sendfile, what shutil.copyfile uses); FAULT=EACCES: opening or creating anything under it is denied.
FAULTS = textwrap.dedent('''
    import builtins, errno, io, os

    _DIR, _FAULT = os.environ.get("FAULT_DIR"), os.environ.get("FAULT")
    _left = [int(os.environ.get("FAULT_BUDGET", "0"))]

    def _hit(path):
        if isinstance(path, int):  # a file descriptor (os.fdopen, sendfile): the file it is open on
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        return os.path.realpath(os.fspath(path)).startswith(_DIR)

    def _spend(n):
        if _left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(n, _left[0])
        _left[0] -= n
        return n

    class _Full:
        def __init__(self, f):
            self._f = f
        def write(self, data):
            n = _spend(len(data))
            self._f.write(data[:n])
            if n < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return n
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self._f.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self._f, name)

    _open, _sendfile, _mkdir = io.open, os.sendfile, os.mkdir

    def _faulty_open(file, mode="r", *args, **kwargs):
        if _DIR and _hit(file):
            if _FAULT == "EACCES" and not isinstance(file, int):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            if _FAULT == "ENOSPC" and any(c in mode for c in "wax+"):
                return _Full(_open(file, mode, *args, **kwargs))
        return _open(file, mode, *args, **kwargs)

    def _faulty_sendfile(out_fd, in_fd, offset, count):
        if not (_DIR and _FAULT == "ENOSPC" and _hit(out_fd)):
            return _sendfile(out_fd, in_fd, offset, count)
        if _left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sent = _sendfile(out_fd, in_fd, offset, min(count, _left[0]))
        _left[0] -= sent
        return sent

    def _faulty_mkdir(path, *args, **kwargs):
        if _DIR and _FAULT == "EACCES" and _hit(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return _mkdir(path, *args, **kwargs)

    if _DIR:
        builtins.open = io.open = _faulty_open
        os.sendfile, os.mkdir = _faulty_sendfile, _faulty_mkdir
''')


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> Path:
    """A Hugging Face model directory as a user points model.local_dir at: the tiny model without our manifest."""
    src = tmp_path_factory.mktemp("good") / "model"
    shutil.copytree(tiny_model_dir, src, ignore=shutil.ignore_patterns("manifest.json"))
    return src


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    (d / "sitecustomize.py").write_text(FAULTS)
    return d


def _project(tmp_path: Path, *overrides: str) -> Path:
    from pipeline.compose import compose_params, write_params

    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    write_params(compose_params(ROOT / "conf", ["tracking=off", *overrides]), project / "params.yaml")
    return project


def _broken(tmp_path: Path, source: Path, mutate) -> Path:
    d = tmp_path / "model"
    shutil.copytree(source, d)
    mutate(d)
    return d


def _weights(project: Path, **env: str) -> subprocess.CompletedProcess:
    if "PYTHONPATH" in env:  # the fault injection first, then whatever the tests run with
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env["PYTHONPATH"], os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "stages.weights"], cwd=project, env=project_env(**env),
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The stage failed with exit 1 and one `error:` line holding every name, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def _leftovers(project: Path) -> list[str]:
    return sorted(p.relative_to(project).as_posix() for p in project.rglob("*")
                  if p.name.endswith((".partial", ".tmp", ".old")))


def _rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_json_key(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- model.source=local: every file the weights stage takes is checked before anything is written ---------------

LOCAL_DIR_FAULTS = {
    # name: (how the directory is damaged, what the error line must name)
    "config.json truncated": (lambda d: _truncate(d / "config.json"), ["config.json", "not valid JSON"]),
    "config.json not UTF-8": (lambda d: (d / "config.json").write_bytes(
        (d / "config.json").read_bytes().replace(b'"llama"', b'"ll\xe9ma"')), ["config.json", "UTF-8"]),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
    "config.json without hidden_size": (lambda d: _drop_json_key(d / "config.json", "hidden_size"),
                                        ["config.json", "hidden_size"]),
    "tokenizer.json truncated": (lambda d: _truncate(d / "tokenizer.json"), ["tokenizer.json"]),
    "tokenizer.json not UTF-8": (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe{}"),
                                 ["tokenizer.json", "UTF-8"]),
    "tokenizer_config.json truncated": (lambda d: _truncate(d / "tokenizer_config.json"),
                                        ["tokenizer_config.json", "not valid JSON"]),
    "tokenizer needs remote code": (lambda d: _rewrite_json(
        d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_acme.AcmeTokenizer", None]}),
        ["tokenizer_config.json", "auto_map", "trust_remote_code"]),
    "safetensors truncated": (lambda d: _truncate(d / "model.safetensors"), ["model.safetensors"]),
    "safetensors index truncated": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {'),
                                    ["model.safetensors.index.json", "not valid JSON"]),
}


@pytest.mark.parametrize("fault", sorted(LOCAL_DIR_FAULTS))
def test_a_damaged_local_model_directory_is_one_line_naming_the_file(tmp_path, source, fault):
    mutate, names = LOCAL_DIR_FAULTS[fault]
    src = _broken(tmp_path, source, mutate)
    project = _project(tmp_path, "model=local", f"model.local_dir={src}")
    _one_line_error(_weights(project), str(src), *names)
    assert not (project / "artifacts").exists() or not any((project / "artifacts").iterdir())


# --- model.source=hub without a network ----------------------------------------------------------------------------

def test_hub_offline_without_a_cached_copy_says_how_to_use_a_local_copy(tmp_path):
    project = _project(tmp_path, "model=llama3-8b")
    line = _one_line_error(_weights(project, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")),
                           "model.hub_id=meta-llama/Meta-Llama-3-8B", "HF_HUB_OFFLINE")
    assert "model.source=local" in line and "model.local_dir" in line


def test_hub_unreachable_says_how_to_use_a_local_copy(tmp_path):
    project = _project(tmp_path, "model=llama3-8b")
    closed = f"http://127.0.0.1:{free_port()}"
    line = _one_line_error(_weights(project, HF_HUB_OFFLINE="0", HF_ENDPOINT=closed, HF_HOME=str(tmp_path / "hf")),
                           "model.hub_id=meta-llama/Meta-Llama-3-8B", "127.0.0.1")
    assert "model.source=local" in line and "HF_HUB_OFFLINE" in line


def test_hub_offline_with_the_model_in_the_cache_copies_the_cached_snapshot(tmp_path, source):
    """What the offline message advises works: HF_HUB_OFFLINE=1 with a filled Hugging Face cache."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny"
    shutil.copytree(source, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    project = _project(tmp_path, "model=local", "model.source=hub", "+model.hub_id=acme/tiny",
                       "model.local_dir=null")
    proc = _weights(project, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((project / "artifacts/weights/manifest.json").read_text())
    assert manifest["resolved_revision"] == sha
    assert sorted(f["path"] for f in manifest["files"]) == sorted(p.name for p in source.iterdir())


# --- disk full and permission denied, injected below the pipeline ------------------------------------------------

def test_disk_full_while_copying_weights_removes_the_partial_output_and_names_the_space(tmp_path, source, faults):
    project = _project(tmp_path, "model=local", f"model.local_dir={source}")
    (project / "artifacts").mkdir()
    line = _one_line_error(_weights(project, PYTHONPATH=str(faults), FAULT="ENOSPC", FAULT_BUDGET="300000",
                                    FAULT_DIR=str(project / "artifacts")),
                           "artifacts/weights", "no space left", "needs more than the 300.00 kB written")
    assert "free some space" in line
    assert list((project / "artifacts").iterdir()) == []


def test_disk_full_while_writing_a_metrics_file_leaves_no_temporary_file(tmp_path, source, faults):
    project = _project(tmp_path, "model=local", f"model.local_dir={source}")
    (project / "metrics").mkdir()
    _one_line_error(_weights(project, PYTHONPATH=str(faults), FAULT="ENOSPC", FAULT_BUDGET="10",
                             FAULT_DIR=str(project / "metrics")),
                    "metrics/weights.json", "no space left", "free some space")
    assert list((project / "metrics").iterdir()) == []
    assert _leftovers(project) == []


def test_an_unreadable_local_model_directory_is_one_line_naming_the_file(tmp_path, source, faults):
    project = _project(tmp_path, "model=local", f"model.local_dir={source}")
    _one_line_error(_weights(project, PYTHONPATH=str(faults), FAULT="EACCES", FAULT_DIR=str(source)),
                    f"{source}/config.json", "permission denied")


def test_an_unwritable_output_directory_is_one_line_naming_it(tmp_path, source, faults):
    project = _project(tmp_path, "model=local", f"model.local_dir={source}")
    (project / "artifacts").mkdir()
    _one_line_error(_weights(project, PYTHONPATH=str(faults), FAULT="EACCES", FAULT_DIR=str(project / "artifacts")),
                    "artifacts/weights", "permission denied")
    assert _leftovers(project) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod denies nothing (the injected EACCES cases above cover this)")
def test_chmod_denied_local_model_directory_is_one_line_naming_the_file(tmp_path, source):
    src = _broken(tmp_path, source, lambda d: (d / "config.json").chmod(0))
    project = _project(tmp_path, "model=local", f"model.local_dir={src}")
    _one_line_error(_weights(project), f"{src}/config.json", "permission denied")


# --- text and data files read by the accuracy, calibration and serving stages ------------------------------------

NOT_UTF8 = "the quick brown fox\n".encode() + b"caf\xe9 latin-1 text\n" * 20


def test_held_out_text_that_is_not_utf8_is_named(tmp_path, tiny_model_dir):
    from pipeline.evaluate import heldout_sequences

    bad = tmp_path / "heldout.txt"
    bad.write_bytes(NOT_UTF8)
    with pytest.raises(PipelineError, match=f"{bad}: not UTF-8"):
        heldout_sequences(tiny_model_dir, seq_len=4, text_path=bad)


def test_calibration_corpus_that_is_not_utf8_is_named(tmp_path):
    from pipeline.calibrate import load_calibration_text

    bad = tmp_path / "corpus.txt"
    bad.write_bytes(NOT_UTF8)
    with pytest.raises(PipelineError, match=f"{bad}: not UTF-8"):
        load_calibration_text(bad)


def test_tokenizer_corpus_that_is_not_utf8_is_named(tmp_path, default_cfg):
    from pipeline.model.tokenizer import train_embedded_tokenizer

    bad = tmp_path / "corpus.txt"
    bad.write_bytes(NOT_UTF8)
    with pytest.raises(PipelineError, match=f"{bad}: not UTF-8"):
        train_embedded_tokenizer(default_cfg.model, tmp_path, corpus=bad)


def test_a_damaged_tokenizer_in_the_weights_directory_is_named(tmp_path, source):
    from pipeline.model.hf import load_tokenizer

    model = _broken(tmp_path, source, lambda d: _truncate(d / "tokenizer.json"))
    with pytest.raises(PipelineError, match=f"{model}.*tokenizer"):
        load_tokenizer(model)


SHAREGPT_FAULTS = {
    "not JSON": (b"{\"conversations\": [", "not valid JSON"),
    "not UTF-8": (b"\xff\xfe[]", "not valid JSON"),
    "empty file": (b"", "not valid JSON"),
    "empty list": (b"[]", "no conversation with two turns"),
    "an object": (b'{"conversations": []}', "expected a JSON list"),
    "entry without conversations": (b'[{"id": 1}]', "entry 0 has no \"conversations\" list"),
    "turn without value": (b'[{"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]',
                           "entry 0: a turn lacks a string \"value\""),
}


@pytest.mark.parametrize("fault", sorted(SHAREGPT_FAULTS))
def test_a_malformed_sharegpt_dataset_is_named_with_the_setting(tmp_path, fault):
    """Already one line before issue 19 (kept as regression cases)."""
    from pipeline.benchmark.workload import sharegpt_requests

    content, message = SHAREGPT_FAULTS[fault]
    path = tmp_path / "sharegpt.json"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=f"serving.dataset_path={path}: .*{message}"):
        sharegpt_requests(path, 4, lambda text: [2, 3], None, 0)


# --- metrics files the report reads ------------------------------------------------------------------------------

def _report_inputs(tmp_path: Path, **files: bytes):
    from pipeline import report

    d = tmp_path / "metrics"
    (d / "weights").mkdir(parents=True)
    runs = ",".join(RUN_COLUMNS) + "\ntorch,bs1_in4_out3," + ",".join(["1"] * (len(RUN_COLUMNS) - 2)) + "\n"
    contents = {"b.json": b"{}", "c.json": b"{}", "runs.csv": runs.encode(), "w.json": b"{}",
                "weights/manifest.json": b'{"files": []}',
                **{name.replace("_", "."): data for name, data in files.items()}}
    for name, data in contents.items():
        (d / name).write_bytes(data)
    return report.ReportInputs(benchmark=d / "b.json", conditions=d / "c.json", runs=d / "runs.csv",
                               weights_metrics=d / "w.json", weights_dir=d / "weights")


REPORT_FAULTS = {
    "benchmark.json truncated": ({"b_json": b'{"torch": {"bs1_in4'}, "b.json", "not valid JSON"),
    "benchmark.json not UTF-8": ({"b_json": b'{"t\xe9": {}}'}, "b.json", "not UTF-8"),
    "benchmark.json a scenario that is not an object": ({"b_json": b'{"torch": [1, 2]}'}, "b.json", "torch"),
    "conditions a list": ({"c_json": b"[]"}, "c.json", "JSON object"),
    "runs truncated mid-row": ({"runs_csv": ",".join(RUN_COLUMNS).encode() + b"\ntorch,bs1_in4_out3,1,1,1,4"},
                               "runs.csv", "rerun the benchmark"),
    "runs not UTF-8": ({"runs_csv": b"backend,scenario\n\xe9,x\n"}, "runs.csv", "not UTF-8"),
}


@pytest.mark.parametrize("fault", sorted(REPORT_FAULTS))
def test_a_damaged_report_input_is_named_in_one_line(tmp_path, fault):
    from pipeline import report

    files, name, message = REPORT_FAULTS[fault]
    inputs = _report_inputs(tmp_path, **files)
    with pytest.raises(PipelineError, match=f"{name}: .*{message}"):
        report.load(inputs)


# --- pending tracking records ------------------------------------------------------------------------------------

def test_backfill_skips_a_malformed_pending_record_with_a_line_naming_it(tmp_path):
    """Already handled before issue 19 (kept as a regression case): the record stays for a later look."""
    project = _project(tmp_path)
    (project / "dvc.yaml").write_text("stages: {}\n")
    pending = project / ".tracking" / "pending"
    for name, data in {"r-truncated": b'{"stage": "weig', "r-latin1": b'{"stage": "\xe9"}', "r-list": b"[1]"}.items():
        (pending / name).mkdir(parents=True)
        (pending / name / "record.json").write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "backfill"], cwd=project, env=project_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    for name in ("r-truncated", "r-latin1", "r-list"):
        assert f"could not backfill {pending / name}" in proc.stderr
    assert "backfilled 0 run(s); 3 left" in proc.stderr


# --- the CLI (python -m pipeline) ---------------------------------------------------------------------------------

def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=project_env(), capture_output=True,
                          text=True, timeout=120)


def test_cli_output_path_blocked_by_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    _one_line_error(_cli(tmp_path, "compose", "--conf", str(ROOT / "conf"), "--output", "afile/params.yaml"),
                    "afile", "check the path")
    assert not list(tmp_path.glob("afile*.tmp"))


def test_cli_serving_results_that_are_not_utf8_are_named(tmp_path):
    (tmp_path / "serving.json").write_bytes(b'{"points": [\xe9]}')
    _one_line_error(_cli(tmp_path, "advise", "--results", "serving.json"), "serving.json: not UTF-8")

"""Atomic outputs: a failed or killed writer leaves nothing at the final path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.errors import PipelineError
from tests.conftest import ROOT


def test_atomic_dir_replaces_only_on_success(tmp_path: Path):
    target = tmp_path / "out"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second, half done")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    assert not (tmp_path / "out.partial").exists()


def test_killed_writer_leaves_no_output_and_next_run_recovers(tmp_path: Path):
    target = tmp_path / "out"
    ready = tmp_path / "ready"
    script = (
        "import sys, time; from pathlib import Path; from pipeline import artifacts\n"
        f"with artifacts.atomic_dir(Path({str(target)!r})) as tmp:\n"
        "    (tmp / 'weights.bin').write_bytes(b'x' * 1000)\n"
        f"    Path({str(ready)!r}).write_text('1')\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert (tmp_path / "out.partial").exists()  # the debris is only ever under .partial
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "ok").write_text("ok")
    assert (target / "ok").exists() and not (tmp_path / "out.partial").exists()


def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "metrics.json"
    artifacts.atomic_write_json(path, {"a": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        artifacts.atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 1' in path.read_text()


def test_verify_manifest_catches_truncation_and_tampering(tmp_path: Path):
    root = tmp_path / "art"
    root.mkdir()
    (root / "w.bin").write_bytes(b"0123456789")
    artifacts.write_manifest(root, kind="test")
    assert artifacts.verify_manifest(root)["kind"] == "test"
    (root / "w.bin").write_bytes(b"01234")
    with pytest.raises(PipelineError, match=r"w.bin: size 5 != 10 in manifest.json \(truncated or replaced\)"):
        artifacts.verify_manifest(root)
    (root / "w.bin").write_bytes(b"abcdefghij")
    with pytest.raises(PipelineError, match="sha256 differs"):
        artifacts.verify_manifest(root)
    (root / "w.bin").unlink()
    with pytest.raises(PipelineError, match="listed in manifest.json but missing"):
        artifacts.verify_manifest(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(PipelineError, match="corrupt manifest"):
        artifacts.verify_manifest(root)
    (root / "manifest.json").unlink()
    with pytest.raises(PipelineError, match="manifest.json: missing; the artifact is incomplete"):
        artifacts.verify_manifest(root)

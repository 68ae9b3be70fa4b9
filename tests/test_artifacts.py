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
    with pytest.raises(PipelineError, match=f"^{path}: disk full"):  # one line naming the file, not a traceback
        artifacts.atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 1' in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # its temporary file removed


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


def _counting_hasher(monkeypatch) -> list[Path]:
    hashed = []
    real = artifacts.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artifacts, "sha256_file", counting)
    return hashed


def _artifact(tmp_path: Path) -> Path:
    root = tmp_path / "art"
    root.mkdir()
    (root / "w.bin").write_bytes(b"0123456789")
    (root / "config.json").write_text("{}")
    artifacts.write_manifest(root, kind="test")
    return root


def test_verify_hashes_each_file_once_while_unchanged(tmp_path: Path, monkeypatch):
    root, cache = _artifact(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(artifacts, "RACY_NS", 0)  # the files were just written; see the racy test below
    hashed = _counting_hasher(monkeypatch)
    artifacts.verify_manifest(root, cache)
    assert sorted(hashed) == ["config.json", "w.bin"]
    assert artifacts.verify_manifest(root, cache)["kind"] == "test"
    assert sorted(hashed) == ["config.json", "w.bin"]  # second verify: no file read
    assert {p.name for p in root.iterdir()} == {"w.bin", "config.json", "manifest.json"}  # DVC hashes root
    assert len(list(cache.glob("*.json"))) == 2
    artifacts.verify_manifest(root, None)  # no cache: always hashed
    assert len(hashed) == 4


def test_verify_cache_catches_rewrites_and_truncation(tmp_path: Path, monkeypatch):
    root, cache = _artifact(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(artifacts, "RACY_NS", 0)
    artifacts.verify_manifest(root, cache)
    w = root / "w.bin"
    old = w.stat()
    # same size, different content, new mtime
    w.write_bytes(b"abcdefghij")
    os.utime(w, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))
    with pytest.raises(PipelineError, match=r"w.bin: sha256 differs from manifest.json \(corrupt or replaced\)"):
        artifacts.verify_manifest(root, cache)
    # same size, different content, the old mtime put back (cp -p, rsync -t): ctime still moves
    time.sleep(0.05)  # > one kernel timestamp tick, so the ctime differs
    w.write_bytes(b"ABCDEFGHIJ")
    os.utime(w, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert w.stat().st_mtime_ns == old.st_mtime_ns and w.stat().st_size == old.st_size
    with pytest.raises(PipelineError, match="w.bin: sha256 differs"):
        artifacts.verify_manifest(root, cache)
    # truncated: caught by size, whatever the cache holds
    w.write_bytes(b"01234")
    with pytest.raises(PipelineError, match=r"w.bin: size 5 != 10 in manifest.json \(truncated or replaced\)"):
        artifacts.verify_manifest(root, cache)
    # the original bytes back: verifies again
    w.write_bytes(b"0123456789")
    artifacts.verify_manifest(root, cache)


def test_verify_cache_skips_racy_files_and_survives_damage(tmp_path: Path, monkeypatch):
    root, cache = _artifact(tmp_path), tmp_path / "cache"
    hashed = _counting_hasher(monkeypatch)
    artifacts.verify_manifest(root, cache)
    artifacts.verify_manifest(root, cache)
    # Written within RACY_NS of the hash: a same-size rewrite in the same timestamp tick would keep every
    # stat field, so such a file is hashed again each time until it has settled.
    assert len(hashed) == 4 and not cache.exists()
    monkeypatch.setattr(artifacts, "RACY_NS", 0)
    artifacts.verify_manifest(root, cache)
    for entry in cache.glob("*.json"):
        entry.write_text("{not json")
    artifacts.verify_manifest(root, cache)  # a damaged entry is a miss, then rewritten
    artifacts.verify_manifest(root, cache)
    assert len(hashed) == 8


def test_verify_cache_entry_is_per_path(tmp_path: Path, monkeypatch):
    """A copy of the artifact elsewhere is hashed on its own, and a tampered copy is caught."""
    import shutil

    root, cache = _artifact(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(artifacts, "RACY_NS", 0)
    artifacts.verify_manifest(root, cache)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "w.bin").write_bytes(b"9876543210")
    with pytest.raises(PipelineError, match="copy/w.bin: sha256 differs"):
        artifacts.verify_manifest(copy, cache)
    artifacts.verify_manifest(root, cache)


def test_verify_missing_manifest_is_an_error(tmp_path: Path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"manifest.json: missing; the artifact is incomplete - rerun the stage"):
        artifacts.verify_manifest(tmp_path, tmp_path / "cache")

"""Atomic outputs: nothing half-written is ever at a path DVC (or a user) would read.

Files are written to `<name>.tmp` beside the target and renamed; directories are built in
`<dir>.partial/` and renamed into place. `manifest.json` is written last inside a directory, so a
manifest means the artifact is complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `path` only if the block completes.

    A leftover `.partial/` from a killed run is removed first; on an exception it is removed too and
    any previous `path` is left untouched."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        # Move the old one aside first so the swap leaves no moment with neither in place.
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under root (except the manifest) with size and sha256, in a stable order."""
    root = Path(root)
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entries.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                            "sha256": sha256_file(p)})
    return entries


def write_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    # No timestamps or timings: a rebuild from the same inputs is byte-identical, so DVC sees nothing
    # changed downstream. Stages report durations in their metrics instead.
    manifest = {"files": file_entries(root), **fields}
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    from pipeline.errors import PipelineError

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path}: missing; the artifact is incomplete - rerun the stage that makes it (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: corrupt manifest ({e.msg}); rerun the stage that makes it (dvc repro)") from None


def verify_manifest(root: Path) -> dict[str, Any]:
    """Check every listed file's size and sha256 before anything loads it."""
    from pipeline.errors import PipelineError

    manifest = read_manifest(root)
    for entry in manifest["files"]:
        p = Path(root) / entry["path"]
        if not p.is_file():
            raise PipelineError(f"{p}: listed in {MANIFEST} but missing; rerun the stage that makes it")
        if p.stat().st_size != entry["bytes"]:
            raise PipelineError(f"{p}: size {p.stat().st_size} != {entry['bytes']} in {MANIFEST} (truncated or replaced)")
        if sha256_file(p) != entry["sha256"]:
            raise PipelineError(f"{p}: sha256 differs from {MANIFEST} (corrupt or replaced)")
    return manifest

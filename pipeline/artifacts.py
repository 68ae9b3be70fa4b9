"""Atomic outputs: nothing half-written is ever at a path DVC (or a user) would read.

Files are written to `<name>.tmp` beside the target and renamed; directories are built in
`<dir>.partial/` and renamed into place. `manifest.json` is written last inside a directory, so a
manifest means the artifact is complete. verify_manifest checks a directory against its manifest
before anything loads it, re-hashing only files that changed since they last matched."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
# Hashes of verified files, keyed by their stat (verified_sha256). Relative to the project root, where
# stages run; git-ignored. Never inside an artifact directory: DVC hashes those.
VERIFY_CACHE = Path(".verify-cache")
RACY_NS = 2_000_000_000  # > the coarsest file timestamp resolution met in practice (FAT: 2 s)


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


def human_bytes(n: float) -> str:
    """Decimal units, as disks and download tools count: 16060522496 -> '16.06 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def check_free_space(target: Path, needed: int) -> int:
    """Fail before anything is written when the filesystem that will hold directory `target` (built by
    atomic_dir) has fewer than `needed` bytes free. A leftover `<target>.partial/` counts as free, since
    atomic_dir removes it first. Returns the bytes free."""
    from pipeline.errors import PipelineError

    target = Path(target)
    probe = target.absolute()
    while not probe.exists():  # the nearest existing ancestor is on the same filesystem
        probe = probe.parent
    free = shutil.disk_usage(probe).free + _tree_bytes(target.with_name(target.name + ".partial"))
    if needed > free:
        raise PipelineError(f"{target}: needs {needed} bytes ({human_bytes(needed)}) but {free} bytes "
                            f"({human_bytes(free)}) are free on its filesystem; free some space (e.g. dvc gc -w) "
                            f"or move the project to a larger disk")
    return free


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


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime as well as mtime: a rewrite that restores the old mtime (cp -p, rsync -t, os.utime) still
    # moves ctime, which no user call can set back.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verified_sha256(path: Path, cache_dir: Path | None = VERIFY_CACHE) -> str:
    """sha256 of path; hashed only when the file changed since it was last hashed here.

    The cache maps (resolved path, device, inode, size, mtime_ns, ctime_ns) -> sha256, one small JSON
    file per path under cache_dir (None: always hash). Any change to the file moves one of those, so
    it is hashed again. A file changed within RACY_NS before hashing is not cached: a rewrite in the same
    timestamp tick would keep every key field (git's "racy clean" problem). Cache files are written
    atomically under a per-process name, so concurrent readers (tp ranks, parallel stages) are safe; an
    unreadable entry is a miss and an unwritable cache only costs the next call a re-hash."""
    path = Path(path).resolve()
    before = path.stat()
    key = _stat_key(before)
    entry_path = None
    if cache_dir is not None:
        entry_path = Path(cache_dir) / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
        try:
            entry = json.loads(entry_path.read_text())
            if entry["path"] == str(path) and entry["stat"] == key:
                return entry["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no entry yet, or a damaged one: hash below and rewrite it
    started = time.time_ns()
    digest = sha256_file(path)
    settled = max(before.st_mtime_ns, before.st_ctime_ns) < started - RACY_NS
    if entry_path is not None and settled and _stat_key(path.stat()) == key:
        tmp = entry_path.with_name(f"{entry_path.name}.{os.getpid()}.tmp")
        try:
            entry_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"path": str(path), "stat": key, "sha256": digest}) + "\n")
            os.replace(tmp, entry_path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return digest


def verify_manifest(root: Path, cache_dir: Path | None = VERIFY_CACHE) -> dict[str, Any]:
    """Check every listed file's size and sha256 before anything loads it. Sizes are always compared;
    a file's sha256 is recomputed only when it changed since it last matched (verified_sha256), so an
    unchanged 16 GB checkout is hashed once, not by every stage that loads it."""
    from pipeline.errors import PipelineError

    manifest = read_manifest(root)
    for entry in manifest["files"]:
        p = Path(root) / entry["path"]
        if not p.is_file():
            raise PipelineError(f"{p}: listed in {MANIFEST} but missing; rerun the stage that makes it")
        if p.stat().st_size != entry["bytes"]:
            raise PipelineError(f"{p}: size {p.stat().st_size} != {entry['bytes']} in {MANIFEST} (truncated or replaced)")
        if verified_sha256(p, cache_dir) != entry["sha256"]:
            raise PipelineError(f"{p}: sha256 differs from {MANIFEST} (corrupt or replaced)")
    return manifest

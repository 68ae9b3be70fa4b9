"""Atomic outputs: nothing half-written is ever at a path DVC (or a user) would read.

Files are written to `<name>.tmp` beside the target and renamed; directories are built in
`<dir>.partial/` and renamed into place. `manifest.json` is written last inside a directory, so a
manifest means the artifact is complete. verify_manifest checks a directory against its manifest
before anything loads it, re-hashing only files that changed since they last matched.

A writer holds an exclusive flock on its `.partial/` (or temp file) while it writes, so a second run writing the
same output fails at once instead of deleting the first one's work, and sweep_stale can tell what a killed run
left (no lock held: the kernel drops a dead process's locks) from what a live one is writing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

MANIFEST = "manifest.json"
# Hashes of verified files, keyed by their stat (verified_sha256). Relative to the project root, where
# stages run; git-ignored. Never inside an artifact directory: DVC hashes those.
VERIFY_CACHE = Path(".verify-cache")
RACY_NS = 2_000_000_000  # > the coarsest file timestamp resolution met in practice (FAT: 2 s)
STALE_SUFFIXES = (".partial", ".old", ".tmp")  # what atomic_dir / atomic_write_* / scratch_dir leave when killed


def _try_lock(path: Path) -> int | None:
    """An open fd holding an exclusive flock on path (file or directory); None when another process holds one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder(path: Path) -> str:
    """' (pid N)' of the process holding a flock on path, from /proc/locks (Linux); '' where that is unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        inode = path.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if f[1] == "FLOCK" and int(f[5].rsplit(":", 1)[1]) == inode:
                return f" (pid {f[4]})"
    return ""


def _lock_new(fd: int, path: Path) -> bool:
    """Lock what this process just created at path (fd open on it); False if a sweep (or a run taking it for a
    killed run's) removed it between its creation and the lock: the caller makes another."""
    fcntl.flock(fd, fcntl.LOCK_EX)  # waits while that other process holds it
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _new_tmp(path: Path) -> tuple[int, Path]:
    """A temp file beside path, named for this writer and locked (see the module docstring): (fd, its path)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
        if _lock_new(fd, Path(tmp)):
            return fd, Path(tmp)
        os.close(fd)


def sweep_stale(directory: Path, recursive: bool = True, outputs: tuple[str, ...] | None = None) -> list[Path]:
    """Remove what killed runs left in directory (and below it): `*.partial` and `*.old` directories and `*.tmp`
    files that no live process holds locked; with `outputs`, only those of these names (`reports.partial`,
    `params.yaml.x1y2.tmp`). Returns what was removed."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [*dirnames, *filenames]:
            if not name.endswith(STALE_SUFFIXES) or (outputs is not None and not name.startswith(
                    tuple(f"{o}." for o in outputs))):
                continue
            stale = Path(dirpath) / name
            with contextlib.suppress(OSError):  # best effort: never fails a stage
                fd = _try_lock(stale)
                if fd is None:
                    continue  # a live run is writing it
                try:
                    shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
                finally:
                    os.close(fd)
                removed.append(stale)
        # Never into what is being swept or written: a live .partial holds its own temp files.
        dirnames[:] = [d for d in dirnames if not d.endswith(STALE_SUFFIXES)] if recursive else []
    return removed


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temporary directory under parent for this process and the processes it starts (tempfile and $TMPDIR
    point at it), removed when the block ends. Locked and named `*.partial`, so one a killed run left (an ONNX
    export's scratch can be as large as the model) is removed by the next sweep_stale of parent."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        scratch = Path(tempfile.mkdtemp(dir=parent, suffix=".partial")).resolve()
        lock = os.open(scratch, os.O_RDONLY)
        if _lock_new(lock, scratch):
            break
        os.close(lock)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = _new_tmp(path)  # its own name: two runs writing one file never share a temp file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before the close drops the lock, so no sweep removes it first
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()  # nothing half-written stays behind (on a full disk it would keep it full)
        if isinstance(e, OSError):
            raise _write_error(path, e, f"writing {human_bytes(len(data))}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `path` only if the block completes.

    A leftover `.partial/` from a killed run is removed first; on an exception it is removed too and
    any previous `path` is left untouched. While the block runs the `.partial/` is locked: another run
    writing `path` at the same time fails with one line instead of deleting this one's work."""
    from pipeline.errors import PipelineError

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile: removed by whoever held it
            held = _try_lock(partial)
            if held is None:
                raise PipelineError(f"{path}: another run is writing it{_holder(partial)} into {partial}; "
                                    "wait for it to finish or stop it, then rerun")
            try:
                shutil.rmtree(partial)  # left by a killed run
            finally:
                os.close(held)
        with contextlib.suppress(FileExistsError):  # another run made one first: look at it again
            partial.mkdir()
            lock = os.open(partial, os.O_RDONLY)
            if _lock_new(lock, partial):
                break
            os.close(lock)
    try:
        try:
            yield partial
        except BaseException as e:
            from pipeline.errors import DISK_FULL

            full = isinstance(e, OSError) and e.errno in DISK_FULL
            written = _tree_bytes(partial) if full else 0
            shutil.rmtree(partial, ignore_errors=True)
            if full:
                raise _write_error(path, e, f"it needs more than the {human_bytes(written)} written") from None
            raise
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            # Move the old one aside first so the swap leaves no moment with neither in place.
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)


def human_bytes(n: float) -> str:
    """Decimal units, as disks and download tools count: 16060522496 -> '16.06 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _free_bytes(target: Path) -> int:
    """Bytes free on the filesystem that holds (or will hold) target."""
    probe = Path(target).absolute()
    while not probe.exists():  # the nearest existing ancestor is on the same filesystem
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _write_error(path: Path, e: OSError, needed: str):
    """The one line of an OSError met while writing path (its partial output already removed); `needed` says
    how much space it needs when the disk is full."""
    from pipeline.errors import DISK_FULL, PipelineError, os_fix

    if e.errno in DISK_FULL:
        return PipelineError(f"{path}: {os_fix(e)} ({needed}, {human_bytes(_free_bytes(path))} free now; the "
                             f"partial output was removed)")
    return PipelineError(f"{path}: {os_fix(e)}")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def check_free_space(target: Path, needed: int) -> int:
    """Fail before anything is written when the filesystem that will hold directory `target` (built by
    atomic_dir) has fewer than `needed` bytes free. A leftover `<target>.partial/` counts as free, since
    atomic_dir removes it first. Returns the bytes free."""
    from pipeline.errors import PipelineError

    target = Path(target)
    free = _free_bytes(target) + _tree_bytes(target.with_name(target.name + ".partial"))
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
        if p.is_file() and p != root / MANIFEST:  # only the top-level one: verify_manifest refuses unlisted files
            entries.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                            "sha256": sha256_file(p)})
    return entries


def write_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    # No timestamps or timings: a rebuild from the same inputs is byte-identical, so DVC sees nothing
    # changed downstream. Stages report durations in their metrics instead.
    manifest = {"files": file_entries(root), **fields}
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def _remake(root: Path) -> str:
    """What to do about a damaged artifact: rerun the stage that makes it (named when root is a known artifact)."""
    from pipeline import paths

    stage = next((a.stage for a in paths.ARTIFACTS.values() if Path(root) == a.path), None)
    return f"rerun the stage that makes it (dvc repro{' ' + stage if stage else ''})"


def _entry_problem(i: int, entry: Any, seen: set[str]) -> str | None:
    """Why files[i] of a manifest is not a {path, bytes, sha256} entry of a file inside the directory, or None."""
    if not isinstance(entry, dict):
        return f"files[{i}] is not an object"
    path, size, digest = entry.get("path"), entry.get("bytes"), entry.get("sha256")
    # Only plain relative POSIX paths as write_manifest records them: never absolute, '..', '.', '' or a
    # backslash, so a hand-edited manifest cannot make a stage check (and then trust) a file outside the artifact.
    if (not isinstance(path, str) or not path or "\\" in path or PurePosixPath(path).as_posix() != path
            or PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor
            or any(part in ("..", ".") for part in path.split("/"))):
        return f"files[{i}].path {path!r} is not a relative path inside the directory"
    if path == MANIFEST or path in seen:
        return f"files[{i}].path {path!r} is listed twice or names the manifest"
    seen.add(path)
    if type(size) is not int or size < 0:
        return f"files[{i}].bytes {size!r} is not a byte count"
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return f"files[{i}].sha256 {digest!r} is not a sha256 hex digest"
    return None


def read_manifest(root: Path) -> dict[str, Any]:
    """root's manifest, checked for shape (an object whose "files" lists {path, bytes, sha256} of files inside
    root) but not against the files: verify_manifest does that. Anything malformed is one PipelineError."""
    from pipeline.errors import PipelineError

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path}: missing; the artifact is incomplete - {_remake(root)}")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise PipelineError(f"{path}: cannot read it ({e.strerror}); check its permissions, or "
                            f"{_remake(root)}") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: corrupt manifest (not UTF-8); {_remake(root)}") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: corrupt manifest ({e.msg} at line {e.lineno} column {e.colno}); "
                            f"{_remake(root)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        problem = ('no "files" list' if isinstance(manifest, dict)
                   else f"a JSON {type(manifest).__name__}, not an object")
        raise PipelineError(f"{path}: malformed manifest ({problem}); {_remake(root)}")
    seen: set[str] = set()
    for i, entry in enumerate(manifest["files"]):
        problem = _entry_problem(i, entry, seen)
        if problem:
            raise PipelineError(f"{path}: malformed manifest ({problem}); {_remake(root)}")
    return manifest


def manifest_field(root: Path, manifest: dict[str, Any], key: str, kind: type = int) -> Any:
    """manifest[key] (dotted: "shape.vocab_size") of artifact root, checked to be a `kind`; its writer always
    sets it, so missing means an old or hand-edited manifest: one line naming both, not a KeyError."""
    value: Any = manifest
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        from pipeline.errors import PipelineError

        raise PipelineError(f"{Path(root) / MANIFEST}: {key} is {value!r}, expected {kind.__name__}; {_remake(root)}")
    return value


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
    """Check root against its manifest before anything loads it: no file it does not list, and every listed
    file with its size and sha256. Sizes are always compared; a file's sha256 is recomputed only when it
    changed since it last matched (verified_sha256), so an unchanged 16 GB checkout is hashed once, not by
    every stage that loads it. Returns the manifest.

    An unlisted file (a pickle planted beside the weights, a leftover of some other tool) is an error, not
    ignored: loaders look files up by name or pattern (*.safetensors, an index's weight_map), so what the
    manifest does not vouch for must not be there to be found."""
    from pipeline.errors import PipelineError

    root = Path(root)
    manifest = read_manifest(root)
    listed = {entry["path"] for entry in manifest["files"]}
    for p in sorted(root.rglob("*")):
        if (p.is_file() or p.is_symlink()) and p != root / MANIFEST and p.relative_to(root).as_posix() not in listed:
            raise PipelineError(f"{p}: not listed in {MANIFEST} (planted or left over); remove it, or {_remake(root)}")
    for entry in manifest["files"]:
        p = root / entry["path"]
        if not p.is_file():
            raise PipelineError(f"{p}: listed in {MANIFEST} but missing; {_remake(root)}")
        if p.stat().st_size != entry["bytes"]:
            raise PipelineError(f"{p}: size {p.stat().st_size} != {entry['bytes']} in {MANIFEST} (truncated or "
                                f"replaced); {_remake(root)}")
        if verified_sha256(p, cache_dir) != entry["sha256"]:
            raise PipelineError(f"{p}: sha256 differs from {MANIFEST} (corrupt or replaced); {_remake(root)}")
    return manifest

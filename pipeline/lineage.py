"""Where a run came from: project root, git commit, dirty flag, the DVC invocation, dependency hashes,
what its config changed relative to conf/, and which metrics files its pipeline declares."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """DVC_ROOT points at the main repo even for queued experiments running in a temp copy."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return here


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def invocation() -> tuple[str | None, str]:
    """Identify the `dvc repro` / `dvc exp run` process this stage runs under.

    DVC runs every stage of one invocation as a child of the same process, so its pid and start time
    key the pipeline run all stages nest under. Returns (key or None when run by hand, the command:
    "dvc repro", "dvc exp run" or "manual"). DVC_EXP_NAME, when set, is part of the key."""
    import psutil

    exp_name = os.environ.get("DVC_EXP_NAME", "")
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = " ".join(proc.cmdline())
            if "dvc" in cmd and any(verb in cmd for verb in (" repro", " exp ", "exec-run")):
                key = f"{exp_name}|{proc.pid}:{proc.create_time():.3f}"
                return key, "dvc " + ("exp run" if " exp " in cmd else "repro")
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return (f"{exp_name}|" if exp_name else None), "manual"


def dependency_hashes(stage: str) -> dict[str, str]:
    """md5 of each dep of `stage`, computed by DVC itself: the same values DVC writes to dvc.lock when
    the stage finishes (dvc.lock cannot be read for them yet, it still holds the previous run)."""
    root = project_root()
    if not (root / "dvc.yaml").is_file():
        return {}  # run outside a DVC project (a library call, a test)
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            found = [s for s in repo.index.stages if getattr(s, "name", None) == stage]
            if not found:
                return {}
            hashes = {}
            from dvc.dependency.param import ParamsDependency

            for dep in found[0].deps:
                if isinstance(dep, ParamsDependency):
                    continue  # their values are logged as params
                # A stage not yet in dvc.lock loads its deps with DVC 2's "md5-dos2unix" name, which hashes
                # binary files differently; DVC 3 writes plain md5 to dvc.lock for new entries.
                if dep.hash_name == "md5-dos2unix":
                    dep.hash_name = "md5"
                hashes[str(dep.def_path)] = str(dep.get_hash().value or "unknown")
            return hashes
    except Exception as e:  # lineage must never fail a stage; say what is missing instead
        return {"_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def config_changes(current: dict[str, Any], conf_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The flattened keys of `current` (a PipelineConfig.to_dict()) whose values differ from what
    `conf_dir` composes to with no overrides, i.e. what this run's `-S`/override changed. Returns
    (changes, None), or (None, reason) when conf/ cannot be composed (run outside the project)."""
    from pipeline.config import flatten

    try:
        from pipeline import compose, config

        if not (conf_dir / "config.yaml").is_file():
            return None, f"{conf_dir}/config.yaml not found"
        baseline = flatten(config.from_dict(compose.compose_dict(conf_dir), source=f"{conf_dir}/").to_dict())
    except Exception as e:  # lineage must never fail a stage
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {k: v for k, v in flatten(current).items() if k not in baseline or baseline[k] != v}, None


def metrics_files(workdir: Path) -> list[Path]:
    """The metrics files dvc.yaml in `workdir` declares (stage `metrics:` entries and the top-level
    `metrics:` list), in dvc.yaml order. `workdir` is where DVC runs the stages and they write their
    outputs: the project root, or a temporary copy for a queued experiment (not DVC_ROOT then)."""
    import yaml

    try:
        spec = yaml.safe_load((workdir / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    entries = [e for stage in (spec.get("stages") or {}).values() if isinstance(stage, dict)
               for e in stage.get("metrics") or []]
    entries += spec.get("metrics") or []
    found: list[Path] = []
    for entry in entries:
        # `- metrics/x.json` or `- metrics/x.json: {cache: false}`
        for name in ([entry] if isinstance(entry, str) else list(entry) if isinstance(entry, dict) else []):
            path = workdir / str(name)
            if path not in found:
                found.append(path)
    return found

"""Helpers for tests that need a real copy of the project, a DVC run or an MLflow server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT


def dvc_products(root: Path) -> set[str]:
    """What `dvc repro` writes in a project: dvc.lock and every stage output (outs, metrics, plots)."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    products = {"dvc.lock"}
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                products.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return products


def copy_project(dst: Path, src_root: Path = ROOT) -> Path:
    """This repo as a fresh clone would have it, in a fresh git repo at dst: tracked and not-ignored untracked
    files (so uncommitted work is tested too), but none of what an earlier `dvc repro` left in the source
    (dvc.lock, untracked stage outputs): with them the copy's first `dvc repro` would rerun nothing."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=src_root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    untracked = set(subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=src_root,
                                   capture_output=True, check=True).stdout.decode().split("\0"))
    products = dvc_products(src_root)
    for rel in filter(None, listed):
        src = src_root / rel
        made_by_dvc = rel == "dvc.lock" or (rel in untracked and any(rel == p or rel.startswith(p.rstrip("/") + "/")
                                                                     for p in products))
        if src.is_file() and not made_by_dvc:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dst, check=True)
    return dst


def project_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # The venv's bin (dvc, mlflow) must be on PATH for the subprocesses.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store in `root`; stopped by its PID."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        env = project_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "server-artifacts")]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def make_backend(name: str, artifact: Path, precision: str = "fp32", device: str = "cpu"):
    """A registry backend handed `artifact` explicitly, as the benchmark launcher does."""
    from pipeline.backends.base import BackendInputs
    from pipeline.backends.registry import load_backend_class

    return load_backend_class(name)(BackendInputs(name, Path(artifact), precision, device))

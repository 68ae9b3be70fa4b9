"""Shared fixtures: the composed default config and a tiny Llama 3 model directory built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(scope="session")
def default_raw() -> dict:
    """conf/ composed with no overrides, as a plain dict (a fresh copy per call is made by callers)."""
    from pipeline.compose import compose_dict

    return compose_dict(ROOT / "conf")


@pytest.fixture
def raw(default_raw) -> dict:
    import copy

    return copy.deepcopy(default_raw)


@pytest.fixture(scope="session")
def default_cfg(default_raw):
    from pipeline import config

    return config.from_dict(default_raw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_cfg) -> Path:
    """The embedded default model (conf/model/tiny.yaml) written by the weights stage's library code."""
    from pipeline import weights

    out = tmp_path_factory.mktemp("tiny") / "weights"
    weights.build(default_cfg.model, out)
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A project dir as DVC runs a stage in: the working directory, with conf/, params.yaml and dvc.yaml;
    the default sqlite store; no MLFLOW_* or DVC_* from the caller's shell."""
    import shutil

    from pipeline import lineage

    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(key)
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lineage, "invocation", lambda: ("|4242:1.000", "dvc repro"))
    # DVC's hashing needs a DVC repo; test_tracking.py's test_real_server_then_outage_then_backfill covers it.
    monkeypatch.setattr(lineage, "dependency_hashes", lambda stage: {})
    return tmp_path

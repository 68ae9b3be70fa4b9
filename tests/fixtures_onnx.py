"""Session fixtures for the ONNX tests: the tiny model as trained by the weights stage, exported once, quantized once
per calibration method, and scored once. Test modules load this file with
`pytest_plugins = ["tests.fixtures_onnx"]` (a star import would run each session fixture once per module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

METHODS = ("minmax", "entropy", "percentile")
# The weights stage's training (model.train_steps / train_lr; train_tiny with seed = model.seed), spelled
# out so a change of conf/model/tiny.yaml shows up in the tests' numbers on purpose, not by accident.
TRAIN = {"train_steps": 150, "train_lr": 2e-3}


def _model_config(default_cfg, **changes):
    import dataclasses

    return dataclasses.replace(default_cfg.model, **changes)


@pytest.fixture(scope="session")
def onnx_tiny_dir(default_cfg, tiny_model_dir, tmp_path_factory) -> Path:
    """The embedded tiny model trained by the weights stage (a random model's logits are too flat for a
    top-1 gate to mean anything; see pipeline/model/train_tiny.py). Reuses tiny_model_dir when the
    default config already trains exactly so."""
    from pipeline import weights

    model = _model_config(default_cfg, **TRAIN)
    if model == default_cfg.model:
        return tiny_model_dir
    out = tmp_path_factory.mktemp("trained") / "weights"
    weights.build(model, out)
    return out


@pytest.fixture(scope="session")
def random_tiny_dir(default_cfg, tiny_model_dir, tmp_path_factory) -> Path:
    """The same preset with random weights only (train_steps=0)."""
    from pipeline import weights

    model = _model_config(default_cfg, train_steps=0)
    if model == default_cfg.model:
        return tiny_model_dir
    out = tmp_path_factory.mktemp("random") / "weights"
    weights.build(model, out)
    return out


@pytest.fixture(scope="session")
def onnx_export(onnx_tiny_dir, tmp_path_factory) -> tuple[Path, dict]:
    from pipeline.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "onnx"
    return out, export_onnx(onnx_tiny_dir, out)


@pytest.fixture(scope="session")
def onnx_int8(onnx_tiny_dir, onnx_export, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """method -> (output dir, manifest) with the default settings (16 samples, seq_len 32, MatMul only)."""
    from pipeline.calibrate import quantize

    root = tmp_path_factory.mktemp("int8")
    return {m: (root / m, quantize(onnx_export[0] / "model.onnx", onnx_tiny_dir, root / m, method=m)) for m in METHODS}


@pytest.fixture(scope="session")
def onnx_accuracy(onnx_tiny_dir, onnx_export, onnx_int8) -> dict:
    from pipeline.evaluate import evaluate

    models = {"onnx_fp32": onnx_export[0] / "model.onnx",
              **{f"onnx_int8_{m}": d / "model.onnx" for m, (d, _) in onnx_int8.items()}}
    return evaluate(onnx_tiny_dir, onnx_models=models)


@pytest.fixture(scope="session")
def onnx_notok_dir(onnx_tiny_dir, tmp_path_factory) -> Path:
    """onnx_tiny_dir without its tokenizer, as the weights stage leaves a random preset made with
    model.tokenizer=source. Same weights, so onnx_export's graph is this model's graph too (no second export)."""
    from pipeline import artifacts

    out = tmp_path_factory.mktemp("notok") / "weights"
    shutil.copytree(onnx_tiny_dir, out)
    for name in ("tokenizer.json", "tokenizer_config.json", artifacts.MANIFEST):
        (out / name).unlink()
    artifacts.write_manifest(out, kind="hf-model", tokenizer=False)
    return out

"""Backend torch-tp: under torchrun it generates the torch backend's greedy tokens, and the benchmark
launcher runs it SPMD with rank 0 reporting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.backends.registry import load_backend_class
from pipeline.benchmark.launcher import worker_command
from pipeline.config import HardwareConfig, PrecisionConfig
from pipeline.convert import trtllm
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import project_env


@pytest.fixture(scope="module")
def tp2pp2_checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "trtllm"
    trtllm.convert(tiny_model_dir, out, tp=2, pp=2, dtype="fp32")
    return out


def _torchrun(nproc: int, *args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tp_backend_generates_the_reference_tokens(tiny_model_dir, tp2pp2_checkpoint, tmp_path):
    out = tmp_path / "tokens.json"
    env = project_env(PIPELINE_TP_CHECKPOINT=str(tp2pp2_checkpoint))
    _torchrun(4, "tests/tp_backend_script.py", str(tiny_model_dir), str(out), env=env)
    reference = load_backend_class("torch")(tiny_model_dir, PrecisionConfig("fp32"), HardwareConfig("cpu"))
    reference.load()
    prompt = torch.randint(2, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    tokens = [reference.prefill(prompt)]
    for _ in range(5):
        tokens.append(reference.decode(tokens[-1]))
    assert json.loads(out.read_text()) == torch.stack(tokens, dim=1).tolist()


def test_benchmark_worker_runs_spmd_under_torchrun(tiny_model_dir, tp2pp2_checkpoint, tmp_path, default_raw):
    raw = json.loads(json.dumps(default_raw))
    raw["parallel"] = {"tp": 2, "pp": 2}
    raw["benchmark"].update(backends=["torch-tp"], prompt_lengths=[8], batch_sizes=[2], output_length=4,
                            warmup_runs=1, measured_runs=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = tmp_path / "result.json"
    cmd = worker_command("torch-tp", params, tiny_model_dir, result, world_size=4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    env = project_env(PIPELINE_TP_CHECKPOINT=str(tp2pp2_checkpoint))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["conditions"]["tp"] == "2" and data["conditions"]["pp"] == "2"
    assert data["metrics"]["bs2_in8_out4"]["tpot_ms_p50"] > 0 and len(data["rows"]) == 2


def test_tp_backend_outside_torchrun_says_how_to_run_it(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    backend = load_backend_class("torch-tp")(tiny_model_dir, PrecisionConfig("fp32"), HardwareConfig("cpu"))
    with pytest.raises(PipelineError, match="runs under torchrun"):
        backend.load()

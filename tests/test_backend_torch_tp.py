"""Backend torch-tp: under torchrun it generates the torch backend's greedy tokens, and the benchmark
launcher runs it SPMD with rank 0 reporting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.benchmark.launcher import worker_command
from pipeline.convert import trtllm
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import make_backend, project_env


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


def _reference_tokens(tiny_model_dir) -> list[list[int]]:
    """The torch backend's greedy tokens for the prompt tests/tp_backend_script.py feeds (3 x 9, seed 0, 6 tokens)."""
    reference = make_backend("torch", tiny_model_dir)
    reference.load()
    prompt = torch.randint(2, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    tokens = [reference.prefill(prompt)]
    for _ in range(5):
        tokens.append(reference.decode(tokens[-1]))
    return torch.stack(tokens, dim=1).tolist()


def test_tp_backend_generates_the_reference_tokens(tiny_model_dir, tp2pp2_checkpoint, tmp_path):
    out = tmp_path / "tokens.json"
    _torchrun(4, "tests/tp_backend_script.py", str(tp2pp2_checkpoint), str(out), env=project_env(PYTHONPATH=str(ROOT)))
    assert json.loads(out.read_text()) == _reference_tokens(tiny_model_dir)


COMPILED_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from tests.helpers import make_backend

backend = make_backend("torch-tp", Path(sys.argv[1]))
backend.inputs = dataclasses.replace(backend.inputs, compile="inductor")
backend.load()
prompt = torch.randint(2, 512, (3, 9), generator=torch.Generator().manual_seed(0))
backend.prepare(3, 9 + 6)
graphs = counters["stats"]["unique_graphs"]
tokens = [backend.prefill(prompt)]
for _ in range(5):
    tokens.append(backend.decode(tokens[-1]))
if backend.is_reporting_rank:
    Path(sys.argv[2]).write_text(json.dumps({"tokens": torch.stack(tokens, dim=1).tolist(), **backend.describe(),
                                             "compiled_while_decoding": counters["stats"]["unique_graphs"] - graphs}))
backend.close()
"""


def test_compiled_tp_decode_step_with_functional_collectives(tiny_model_dir, tmp_path_factory, tmp_path):
    """benchmark.compile=inductor: each rank's decode step compiles with its all-reduces and the logits
    all-gather inside the graph (fullgraph=True fails on a graph break), on gloo here, NCCL on CUDA."""
    ckpt = tmp_path_factory.mktemp("tp2") / "trtllm"
    trtllm.convert(tiny_model_dir, ckpt, tp=2, pp=1, dtype="fp32")
    script, out = tmp_path / "compiled_tp.py", tmp_path / "out.json"
    script.write_text(COMPILED_SCRIPT)
    _torchrun(2, str(script), str(ckpt), str(out), env=project_env(PYTHONPATH=str(ROOT)))
    data = json.loads(out.read_text())
    assert data["tokens"] == _reference_tokens(tiny_model_dir)
    assert data["decode_step"] == "inductor" and list(data["compile_s_by_shape"]) == ["bs3_len15"]
    assert data["compile_s"] > 0 and data["compiled_while_decoding"] == 0


def test_benchmark_worker_runs_spmd_under_torchrun(tp2pp2_checkpoint, tmp_path):
    job = {"inputs": {"backend": "torch-tp", "artifact": str(tp2pp2_checkpoint), "precision": "fp32",
                      "device": "cpu", "num_threads": 0},
           "benchmark": {"backends": ["torch-tp"], "prompt_lengths": [8], "batch_sizes": [2], "output_length": 4,
                         "warmup_runs": 1, "measured_runs": 2, "seed": 0},
           "vocab_size": 512, "distributed": True, "world_size": 4,
           # What the launcher adds for the roofline: the model shape (the checkpoint manifest records it),
           # published figures (so nothing is measured here) and how lm_head is stored.
           "model": json.loads((tp2pp2_checkpoint / "manifest.json").read_text())["model"],
           "hardware": {"device": "cpu", "num_threads": 0, "name": "test", "measure": False,
                        "memory_bandwidth_gbs": 10.0, "peak_tflops": {"fp32": 1.0}},
           "lm_head_quantized": False}
    job_path, result = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(job))
    cmd = worker_command(job, job_path, result)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["conditions"]["tp"] == 2 and data["conditions"]["pp"] == 2
    assert data["metrics"]["bs2_in8_out4"]["tpot_ms_p50"] > 0 and len(data["rows"]) == 2
    assert {(r["tp"], r["pp"]) for r in data["rows"]} == {(2, 2)}


def test_tp_backend_outside_torchrun_says_how_to_run_it(tp2pp2_checkpoint, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    backend = make_backend("torch-tp", tp2pp2_checkpoint)
    with pytest.raises(PipelineError, match="runs under torchrun"):
        backend.load()

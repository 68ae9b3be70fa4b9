"""Run a converted checkpoint through the TP x PP runner (torchrun in a subprocess) and compare it with
Hugging Face LlamaForCausalLM in float32, the project's reference."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.parallel import launch
from pipeline.parallel.mapping import Mapping
from pipeline.runner.run import ERROR_PREFIX

ROOT = Path(__file__).resolve().parents[2]  # the project root: torchrun's ranks import `pipeline` from it


def torchrun_command(fmt: str, checkpoint_dir: Path, tp: int, pp: int, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int, output: Path, *, backend: Optional[str] = None,
                     dtype: Optional[str] = None, nnodes: int = 1, rdzv_endpoint: Optional[str] = None) -> list[str]:
    """The runner's torchrun command: tp * pp ranks on this node, or this node's tp * pp / nnodes of them."""
    if (tp * pp) % nnodes:
        raise PipelineError(f"parallel.tp * parallel.pp = {tp * pp} ranks do not split evenly over {nnodes} nodes")
    args = ["--format", fmt, "--checkpoint", str(checkpoint_dir), "--tp", str(tp), "--pp", str(pp),
            "--max-new-tokens", str(max_new_tokens), "--output", str(output)]
    for prompt in prompts:
        args += ["--prompt-ids", ",".join(str(t) for t in prompt)]
    if backend:
        args += ["--backend", backend]
    if dtype:
        args += ["--dtype", dtype]
    return launch.torchrun_command(tp * pp // nnodes, "pipeline.runner.run", args, nnodes=nnodes,
                                   rdzv_endpoint=rdzv_endpoint)


def run_parallel(fmt: str, checkpoint_dir: Path, tp: int, pp: int, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, *, backend: Optional[str] = None, dtype: Optional[str] = None,
                 timeout_s: float = 600) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(result.json, prompt logits) of one torchrun launch; a failing rank's one-line error is re-raised."""
    from safetensors.torch import load_file

    Mapping(tp, pp)  # validates tp/pp before anything starts
    with tempfile.TemporaryDirectory(prefix="parallel-verify-") as tmp:
        output = Path(tmp) / "result.json"
        # Absolute: the ranks run in ROOT, which is not the stage's directory in a `dvc exp run --temp` copy or
        # another checkout using this install; a relative path would load that tree's checkpoint, not the verified one.
        cmd = torchrun_command(fmt, Path(checkpoint_dir).resolve(), tp, pp, prompts, max_new_tokens, output,
                               backend=backend, dtype=dtype)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"torchrun ({fmt}, tp={tp}, pp={pp}) did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not output.is_file():
            errors = [line.split(ERROR_PREFIX, 1)[1] for line in proc.stderr.splitlines() if ERROR_PREFIX in line]
            tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            launch = f"torchrun ({fmt}, tp={tp}, pp={pp})"
            raise PipelineError(errors[0] if errors else f"{launch} failed with exit code {proc.returncode}: {tail[0]}")
        result = json.loads(output.read_text())
        logits = load_file(str(output.with_name(result["logits_file"])))
    return result, [logits[f"prompt{i}"] for i in range(len(prompts))]


@functools.lru_cache(maxsize=8)  # one HF run per (model, prompts, tokens) per process: formats share it
def _hf_reference(hf_model_dir: str, prompts: tuple, max_new_tokens: int) -> tuple:
    return tuple(hf_reference(Path(hf_model_dir), [list(p) for p in prompts], max_new_tokens))


def hf_reference(hf_model_dir: Path, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int) -> list[tuple[torch.Tensor, list[int]]]:
    """(prompt logits [s, V], greedy tokens) per prompt from HF float32. Each step re-runs the whole sequence
    without a cache, so the runner's KV cache is checked against an independent computation."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)])
            logits = model(input_ids=ids).logits[0].float()
            tokens, seq = [], ids
            for _ in range(max_new_tokens):
                nxt = model(input_ids=seq).logits[0, -1].argmax() if tokens else logits[-1].argmax()
                tokens.append(int(nxt))
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            out.append((logits, tokens))
    return out


def compare(result: dict[str, Any], logits: list[torch.Tensor],
            reference: Sequence[tuple[torch.Tensor, list[int]]]) -> dict[str, Any]:
    diffs, agree, positions, exact = [], 0, 0, True
    for got, (want, want_tokens), tokens in zip(logits, reference, result["tokens"]):
        diffs.append(float((got - want).abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += want.shape[0]
        exact &= tokens == want_tokens
    return {"logits_max_abs_diff": max(diffs), "top1_agreement": agree / positions,
            "generation_token_exact": int(exact), "tokens": result["tokens"],
            "reference_tokens": [t for _, t in reference]}


def verify(fmt: str, checkpoint_dir: Path, hf_model_dir: Path, tp: int, pp: int,
           prompts: Sequence[Sequence[int]], max_new_tokens: int, *, backend: Optional[str] = None,
           dtype: Optional[str] = None, timeout_s: float = 600) -> dict[str, Any]:
    """Metrics of one format at one TP x PP against HF float32: logits_max_abs_diff (prompt logits),
    top1_agreement (fraction of prompt positions with the same argmax), generation_token_exact (1 if every
    prompt's max_new_tokens greedy tokens match, else 0)."""
    t0 = time.perf_counter()
    result, logits = run_parallel(fmt, checkpoint_dir, tp, pp, prompts, max_new_tokens, backend=backend,
                                  dtype=dtype, timeout_s=timeout_s)
    run_s = time.perf_counter() - t0
    reference = _hf_reference(str(Path(hf_model_dir).resolve()), tuple(tuple(p) for p in prompts), max_new_tokens)
    metrics = compare(result, logits, reference)
    return {"format": fmt, "tp": tp, "pp": pp, "backend": result["backend"],
            "weight_dtype": result["weight_dtype"], "compute_dtype": result["compute_dtype"],
            "int8_mode": result["int8_mode"], **metrics, "torchrun_wall_s": run_s}

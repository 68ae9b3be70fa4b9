"""Stage `verify_parallel`: run each converted checkpoint with the TP x PP runner and gate it against
Hugging Face fp32 (logits max-abs-diff, top-1 agreement, token-exact greedy generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import artifacts
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.progress import console


def verification_prompts(cfg: PipelineConfig, vocab_size: int) -> list[list[int]]:
    """Seeded random ids (ids 0/1 are reserved for BOS/EOS in the embedded tokenizer): the check is about
    arithmetic, so any ids do, and random presets without a tokenizer work too."""
    gen = torch.Generator().manual_seed(cfg.verify.seed)
    shape = (cfg.verify.num_prompts, cfg.verify.prompt_length)
    return torch.randint(2, vocab_size, shape, generator=gen).tolist()


def _distributed_backend(cfg: PipelineConfig) -> str:
    if cfg.hardware.device != "cuda":
        return "gloo"
    world = cfg.parallel.world_size
    found = torch.cuda.device_count()
    if found < world:
        raise PipelineError(f"parallel.tp x parallel.pp = {world} ranks need {world} GPUs with hardware=cuda, "
                            f"found {found}; use hardware=cpu (gloo) or a smaller layout")
    return "nccl"


def gate(result: dict[str, Any], dtype: str, cfg: PipelineConfig) -> tuple[bool, str]:
    if result["top1_agreement"] < cfg.verify.min_top1:
        return False, f"top-1 agreement {result['top1_agreement']:.4f} < verify.min_top1={cfg.verify.min_top1}"
    atol = cfg.verify.atol(dtype)
    if atol is not None and not result["logits_max_abs_diff"] <= atol:
        return False, (f"logits max-abs-diff {result['logits_max_abs_diff']:.3g} > {atol} (verify.max_abs_diff, "
                       f"null = the precision table's {dtype} tolerance)")
    if atol is not None and not result["generation_token_exact"]:
        return False, "greedy tokens differ from Hugging Face fp32"
    return True, ""


def verify_all(cfg: PipelineConfig, weights_dir: Path, checkpoints: dict[str, Path]) -> dict[str, Any]:
    from pipeline.runner.verify import verify

    vocab = artifacts.manifest_field(weights_dir, artifacts.verify_manifest(weights_dir), "shape.vocab_size")
    prompts = verification_prompts(cfg, vocab)
    backend = _distributed_backend(cfg)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    metrics: dict[str, Any] = {}
    failures = []
    # Every input verified before the first (minutes-long) torchrun, so a damaged one fails the stage at once.
    manifests = {fmt: artifacts.verify_manifest(checkpoints[fmt]) for fmt in cfg.convert.formats}
    for fmt, manifest in manifests.items():
        ckpt = checkpoints[fmt]
        if (manifest.get("tp"), manifest.get("pp")) != (tp, pp):
            raise PipelineError(f"{ckpt}: converted for tp={manifest.get('tp')} pp={manifest.get('pp')}, params.yaml "
                                f"asks tp={tp} pp={pp}; rerun convert_{fmt} (dvc repro)")
        dtype = artifacts.manifest_field(ckpt, manifest, "dtype", str)
        console.print(f"verify {fmt}: tp={tp} pp={pp} on {backend} ({tp * pp} ranks)")
        result = verify(fmt, ckpt, weights_dir, tp, pp, prompts, cfg.verify.max_new_tokens, backend=backend,
                        timeout_s=cfg.verify.timeout_s)
        passed, why = gate(result, dtype, cfg)
        metrics[fmt] = {"logits_max_abs_diff": result["logits_max_abs_diff"],
                        "top1_agreement": result["top1_agreement"],
                        "generation_token_exact": result["generation_token_exact"],
                        "gate_pass": int(passed), "torchrun_wall_s": round(result["torchrun_wall_s"], 2)}
        if not passed:
            failures.append(f"{fmt} (tp={tp}, pp={pp}, {dtype}): {why}")
    metrics["layout"] = {"tp": tp, "pp": pp, "world_size": tp * pp}
    if failures and cfg.verify.on_fail == "error":
        raise PipelineError(f"verify_parallel failed for {'; '.join(failures)} (set verify.on_fail=warn to record "
                            f"it without failing)")
    for failure in failures:
        console.print(f"[yellow]warning: verify_parallel gate failed for {failure}[/yellow]")
    return metrics

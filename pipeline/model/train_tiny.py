"""Briefly train the embedded tiny model on the embedded corpus, so its next-token distributions are
peaked rather than flat.

Why: a random-init model's logits are nearly uniform (held-out ppl ~ vocab size), so any
perturbation, however small, flips the argmax, and INT8 top-1 agreement lands near 0.93 whatever
the calibration method, while a ppl delta on a uniform distribution is meaningless. A few hundred
AdamW steps on CPU give the accuracy gate something real to measure.

The weights are replaced in place (atomically per file); the caller writes the directory's
manifest afterwards (e.g. inside weights.build's atomic_dir, before write_manifest)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError


def train_tiny(model_dir: Path, corpus_path: Path, steps: int = 150, seed: int = 0, lr: float = 2e-3,
               batch_size: int = 8, seq_len: int = 64) -> dict[str, Any]:
    """Train model_dir's LlamaForCausalLM on corpus_path (next-token loss, AdamW, linear warm-up then
    cosine decay) and overwrite model.safetensors. Returns first/last loss and timing."""
    from safetensors.torch import save_file

    from pipeline.model.hf import load_hf_model, load_tokenizer

    model_dir, corpus_path = Path(model_dir), Path(corpus_path)
    if steps < 1 or batch_size < 1 or seq_len < 2 or not lr > 0:
        raise PipelineError(f"train_tiny: steps, batch_size must be >= 1, seq_len >= 2 and lr > 0; got steps={steps}, "
                            f"batch_size={batch_size}, seq_len={seq_len}, lr={lr}")
    if not (model_dir / "model.safetensors").is_file():
        raise PipelineError(f"{model_dir}/model.safetensors: not found; train_tiny handles single-file (tiny) "
                            f"models only")
    ids = torch.tensor(load_tokenizer(model_dir)(corpus_path.read_text(encoding="utf-8")).input_ids)
    if len(ids) < seq_len:
        raise PipelineError(f"{corpus_path}: {len(ids)} tokens, too few for training windows of {seq_len}")
    storage_dtype = getattr(torch, json.loads((model_dir / "config.json").read_text()).get("dtype", "float32"))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = load_hf_model(model_dir, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up over 10 % of the steps, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses = []
    # One thread: at hidden 64 the matmuls are too small to split, and on a shared 2-core machine
    # two threads spin-waiting on each other made training 20x slower (96 s vs 4.6 s, same losses).
    # It also makes the weights independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=gen)
            batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
            # labels=input_ids: transformers shifts them internally, so this is next-token loss.
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().to(storage_dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    tmp = model_dir / "model.safetensors.tmp"  # same directory, then rename: never a half-written file
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, model_dir / "model.safetensors")
    return {"steps": steps, "seed": seed, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
            "loss_first": round(losses[0], 4), "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "train_s": round(seconds, 2)}

"""Smoke test of the torch-compiled decode step on one GPU, before a full pipeline run (not a test: CI never runs it).

Random bf16 weights of the Llama-3-8B shape (conf/model/llama3-8b.yaml) are made directly on the GPU (no 16 GB
file, no network); for each batch size: setup_cache, compile + record the CUDA graph of the decode step (timed
on its own), an eager prefill of `--prompt` random tokens, then `--steps` timed decode steps, each followed by a
device sync as the benchmark runner does. Prints ms/token, tok/s, compile s and the weight bandwidth it implies.

    python benchmarks/compiled_smoke.py                       # H200: batch 1 / 64 / 256, prompt 128
    python benchmarks/compiled_smoke.py --layers 2 --batches 1,8 --eager   # quick look, no compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.model.args import LLAMA3_ROPE_KEYS, LlamaArgs  # noqa: E402
from pipeline.model.fused import DecodeStep  # noqa: E402
from pipeline.model.llama import Llama  # noqa: E402

INDUCTOR_CACHE_DIR = ROOT / ".cache/inductor"  # as pipeline/backends/torch_compiled.py, so the benchmark reuses it


def model_args(preset: Path, layers: int | None) -> LlamaArgs:
    m = yaml.safe_load(preset.read_text())
    rope = m.get("rope_scaling")
    return LlamaArgs(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                     intermediate_size=m["intermediate_size"], num_layers=layers or m["num_layers"],
                     num_heads=m["num_heads"], num_kv_heads=m["num_kv_heads"],
                     head_dim=m["hidden_size"] // m["num_heads"], rms_norm_eps=m["rms_norm_eps"],
                     rope_theta=m["rope_theta"], max_position_embeddings=m["max_position_embeddings"],
                     rope_scaling={k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope else None)


def build(args: LlamaArgs, device: torch.device) -> Llama:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16, on the device: no fp32 copy
    try:
        with device:
            model = Llama(args)
            for p in model.parameters():
                if p.dim() == 2:  # linears and the embedding; RMSNorm weights stay 1
                    p.data.normal_(0.0, 0.02)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "conf/model/llama3-8b.yaml")
    p.add_argument("--layers", type=int, help="fewer layers for a quick look (default: the preset's)")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eager", action="store_true", help="do not compile the decode step")
    opts = p.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    args = model_args(opts.model, opts.layers)
    t0 = time.perf_counter()
    model = build(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    # Bytes read per decode step: every weight matrix once; of the embedding only the looked-up rows.
    weight_bytes = 2 * (n_params - args.vocab_size * args.hidden_size)
    print(f"{args.num_layers} layers, {n_params / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.1f} s")
    step = DecodeStep(model, compiled=not opts.eager, cache_dir=INDUCTOR_CACHE_DIR)
    print(f"decode step: {step.kind}; inductor cache {INDUCTOR_CACHE_DIR}")
    for batch in (int(b) for b in opts.batches.split(",")):
        model.setup_cache(batch, opts.prompt + opts.steps + 1)
        with torch.inference_mode():
            pos = torch.zeros(1, dtype=torch.int64, device=device)
            warm_tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
            compile_s = step.warm_up(lambda: step(warm_tokens, pos))
            prompt = torch.randint(0, args.vocab_size, (batch, opts.prompt), device=device)
            for _ in range(2):  # the second prefill is the one timed (first-call allocations)
                sync(device)
                t0 = time.perf_counter()
                logits = model(prompt, torch.arange(opts.prompt, device=device), new_sequence=True, last_only=True)
                tokens = logits[:, -1].argmax(dim=-1)
                sync(device)
                prefill_ms = (time.perf_counter() - t0) * 1e3
            pos = torch.tensor([opts.prompt], device=device)
            times = []
            for _ in range(opts.steps):
                t0 = time.perf_counter()
                tokens = step(tokens[:, None], pos)
                pos += 1
                sync(device)
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times[len(times) // 4:]) * 1e3  # drop the first quarter: clocks ramp up
        ok = bool(((tokens >= 0) & (tokens < args.vocab_size)).all())
        mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"batch {batch:4d}: decode {ms:8.3f} ms/token  {batch / ms * 1e3:10.1f} tok/s  "
              f"(weights {weight_bytes / (ms / 1e3) / 1e12:.2f} TB/s)  prefill {prefill_ms:8.1f} ms  "
              f"compile {compile_s:6.1f} s{mem}  tokens {'ok' if ok else 'OUT OF RANGE'}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

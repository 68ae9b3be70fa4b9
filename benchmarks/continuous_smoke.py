"""CUDA check of continuous batching (compiled decode step, dynamic batch, a CUDA graph per slot bucket) against each
prompt decoded alone, on a small random Llama in bf16 (with GEMV routing) and fp8. Run on an H200 in the serving
leases (BENCHMARKS.md, log in benchmarks/h200-llama3-8b-serving/): batching changes the bf16/fp8 matmul shapes,
so a near-tie can flip a greedy token; the CPU tests (fp32) require exact equality.

    python benchmarks/continuous_smoke.py [bf16] [fp8]
"""
import random
import sys
import time
from pathlib import Path

import torch

from pipeline.backends.continuous import ContinuousBatchEngine
from pipeline.backends.requests import EngineLimits, Request
from pipeline.model import gemv, quant
from pipeline.model.args import LlamaArgs
from pipeline.model.fused import DecodeStep
from pipeline.model.llama import Llama

dev = torch.device("cuda")
torch.manual_seed(0)
args = LlamaArgs(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2, max_position_embeddings=256, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_scaling=None)
for prec in sys.argv[1:] or ("bf16", "fp8"):
    m = Llama(args).eval()
    for p in m.parameters(): torch.nn.init.normal_(p, std=0.1)
    m = m.to(dev, torch.bfloat16)
    if prec == "fp8": quant.quantize_(m, "fp8")
    else: gemv.route_float_linears_(m)
    def alone(prompt, n):
        m.setup_cache(1, 64)
        with torch.inference_mode():
            x = torch.tensor([prompt], device=dev); out=[]
            t = m(x, torch.arange(len(prompt), device=dev), new_sequence=True, last_only=True)[:, -1].argmax(-1)
            out.append(int(t)); pos=len(prompt)
            for _ in range(n-1):
                t = m(t[:,None], torch.tensor([pos], device=dev))[:, -1].argmax(-1); pos+=1; out.append(int(t))
        return out
    rng = random.Random(0)
    reqs = [Request(i, tuple(rng.randrange(2,256) for _ in range(rng.randint(3,20))), rng.randint(1,12)) for i in range(40)]
    ref = {r.id: alone(list(r.prompt), r.max_new_tokens) for r in reqs}
    step = DecodeStep(m, True, Path(".cache/inductor"), dynamic_batch=True)
    eng = ContinuousBatchEngine(m, step, EngineLimits(16, 40, 64, (2, 4, 8, 16)))
    t0 = time.time(); print(prec, "warm_up", eng.warm_up(), round(time.time()-t0, 1), flush=True)
    got = {r.id: [] for r in reqs}; pending = list(reqs); it = 0
    while pending or eng.has_unfinished_requests():
        if pending and it % 2 == 0:
            for _ in range(3):
                if pending: eng.add_request(pending.pop(0))
        for e in eng.step(): got[e.request_id].append(e.token)
        it += 1
    agree = sum(got[i] == ref[i] for i in ref)
    print(prec, "requests equal to alone:", agree, "/", len(ref), "free", sorted(eng.free) == list(range(16)), eng.counts(), flush=True)
    # fp8 activations are quantized per row, so batching can change rounding: report token agreement too
    tok = sum(a == b for i in ref for a, b in zip(got[i], ref[i])); tot = sum(len(ref[i]) for i in ref)
    print(prec, "token agreement", tok, "/", tot, flush=True)

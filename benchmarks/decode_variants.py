"""Batch-1 decode-step variants of the Llama-3-8B shape on one GPU (random weights made on the GPU; not a test):
how each linear is computed (cuBLAS / inductor's fused reduction vs the Triton GEMV, float and 8-bit weights),
the step time with and without a device sync per step, a kernel profile of one step, and eager vs compiled
prefill of 2,048 tokens against an 8192^3 bf16 matmul.

    python benchmarks/decode_variants.py bf16-cublas,bf16-gemv,int8-wo-gemv,int8-wo-inductor,fp8-wo-gemv

"bf16-cublas" is the model's plain nn.Linear (inductor decides how to compute it). The run recorded in
BENCHMARKS.md (benchmarks/h200-llama3-8b-torch-compiled/decode_variants.log) used DecodeStep as it was then,
torch.compile(mode="reduce-overhead"); DecodeStep now captures its own CUDA graph, the change that log's
"no per-step sync" column motivated."""
import copy, statistics, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
from compiled_smoke import build, model_args
from pipeline.model import gemv, quant
from pipeline.model.fused import DecodeStep

dev = torch.device("cuda")
args = model_args(ROOT / "conf/model/llama3-8b.yaml", None)
base = build(args, dev)
print("built", flush=True)
ORIG = quant._dequant_linear


def variant(name):
    quant._dequant_linear = ORIG
    if name == "bf16-cublas":
        return base
    if name == "bf16-gemv":
        return gemv.route_float_linears_(copy.deepcopy(base))
    prec, path = name.rsplit("-", 1)
    m = quant.quantize_(copy.deepcopy(base), prec)
    if path == "inductor":
        quant._dequant_linear = quant._dequant_matmul
    return m


def time_decode(model, steps=64, prompt=128, profile=False):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    step = DecodeStep(model, True, ROOT / ".cache/inductor")
    model.setup_cache(1, prompt + steps + 1)
    with torch.inference_mode():
        pos = torch.zeros(1, dtype=torch.int64, device=dev)
        tok = torch.zeros(1, 1, dtype=torch.int64, device=dev)
        c = step.warm_up(lambda: step(tok, pos))
        pos = torch.tensor([prompt], device=dev)
        tokens = torch.zeros(1, dtype=torch.int64, device=dev)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            tokens = step(tokens[:, None], pos); pos += 1
            torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
        # the same steps without a sync per step (device time only)
        pos = torch.tensor([prompt], device=dev)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(steps):
            tokens = step(tokens[:, None], pos); pos += 1
        torch.cuda.synchronize(); nosync = (time.perf_counter() - t0) / steps
        skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprof
            pos = torch.tensor([prompt], device=dev)
            with tprof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    tokens = step(tokens[:, None], pos); pos += 1
                torch.cuda.synchronize()
    return statistics.median(times[16:]) * 1e3, nosync * 1e3, c, skips, prof


which = sys.argv[1].split(",")
for name in which:
    m = variant(name)
    ms, ns, c, skips, prof = time_decode(m, profile=name in ("bf16-cublas", "int8-wo-gemv", "fp8-wo-gemv"))
    print(f"{name:18} {ms:.3f} ms/token (no per-step sync {ns:.3f})  compile {c:.1f} s  cudagraph counters {skips}", flush=True)
    if prof is not None:
        ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        tot = sum(e.self_device_time_total for e in ev)
        n = sum(e.count for e in ev)
        print(f"  profile: {n/5:.0f} kernels/step, {tot/5/1e3:.3f} ms kernel time/step")
        for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:14]:
            print(f"   {e.self_device_time_total/5:9.1f} us/step {e.count/5:6.0f}/step  {e.key[:90]}")
    if m is not base:
        del m
    torch.cuda.empty_cache()

quant._dequant_linear = ORIG
# prefill 2048, batch 1: eager vs compiled (default mode)
L = 2048
flops = 2 * L * sum(p.numel() for n, p in base.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
flops += 2 * base.lm_head.weight.numel() + 2 * 2 * args.num_layers * args.hidden_size * L * L / 2
base.setup_cache(1, L + 8)
ids = torch.randint(0, args.vocab_size, (1, L), device=dev)
posn = torch.arange(L, device=dev)
def pre(fn):
    with torch.inference_mode():
        for _ in range(2):
            fn()
        ts = []
        for _ in range(5):
            torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
e = pre(lambda: base(ids, posn, new_sequence=True, last_only=True))
print(f"prefill {L} eager {e:.2f} ms = {flops / e / 1e9:.0f} TFLOP/s", flush=True)
torch._dynamo.reset()
cf = torch.compile(lambda a, b: base(a, b, new_sequence=True, last_only=True), dynamic=False)
t0 = time.perf_counter(); pre(lambda: cf(ids, posn)); ct = time.perf_counter() - t0
c = pre(lambda: cf(ids, posn))
print(f"prefill {L} compiled {c:.2f} ms = {flops / c / 1e9:.0f} TFLOP/s (compile {ct:.0f} s)", flush=True)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
mm = pre(lambda: a @ b)
print(f"matmul 8192^3 {2*8192**3/mm/1e9:.0f} TFLOP/s")

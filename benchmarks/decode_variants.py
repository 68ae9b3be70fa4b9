"""Diagnostic (not committed): batch-1 decode step variants on the 8B shape, cudagraph skips, kernel profile,
eager vs compiled prefill."""
import copy, statistics, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
import torch.nn.functional as F
from torch import nn
from compiled_smoke import build, model_args
from pipeline.model import gemv, quant
from pipeline.model.fused import DecodeStep

dev = torch.device("cuda")
args = model_args(ROOT / "conf/model/llama3-8b.yaml", None)
base = build(args, dev)
print("built", flush=True)
ORIG = quant._dequant_linear


class GemvLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.weight = lin.weight
        self.register_buffer("scale", torch.ones(lin.out_features, device=lin.weight.device))
    def forward(self, x):
        if x.numel() == x.shape[-1]:
            return gemv.gemv(x.reshape(1, -1), self.weight, self.scale).reshape(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight)


def variant(name):
    quant._dequant_linear = ORIG
    if name == "bf16-cublas":
        return base
    if name == "bf16-gemv":
        m = copy.deepcopy(base)
        for n, mod in list(m.named_modules()):
            if isinstance(mod, nn.Linear):
                p, _, c = n.rpartition("."); setattr(m.get_submodule(p), c, GemvLinear(mod))
        return m
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

"""What stages and backends need from the machine (packages, GPUs, executables), and what it has.

One table says what each needs. The backend registry names its packages (`BackendSpec.requires`) and `STAGES`
below names the stages'. `probe()` reads the machine: no heavy package is imported, only found. `why_not()`
compares the two and gives the first reason in one line, naming the extra that installs the package.
`python -m pipeline doctor` prints the verdict for every stage and backend. A stage or backend that cannot run
calls `require()` before it writes anything, so it fails with that same line."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import Mapping, Optional

from pipeline.errors import PipelineError

GIB = 1 << 30
# Weights are not all a GPU must hold (activations, KV cache, CUDA context, workspace): they may fill at most
# this share of its memory before a configuration is called too big for it.
WEIGHT_SHARE_OF_GPU = 0.9


@dataclass(frozen=True)
class Package:
    module: str                     # the import name
    extra: Optional[str]            # pyproject extra that installs it; None = a core dependency
    minimum: Optional[str] = None   # lowest version that works
    below: Optional[str] = None     # first version that does not
    reason: str = ""                # why the range (said when a version falls outside it)

    def install_hint(self) -> str:
        if self.extra is None:
            return "pip install -e . (a core dependency)"
        gpu = " on a machine with an NVIDIA GPU and driver" if self.extra in ("tensorrt", "trtllm") else ""
        return f"pip install -e '.[{self.extra}]'{gpu}"


PACKAGES: dict[str, Package] = {
    "torch": Package("torch", None),
    "transformers": Package("transformers", None),
    "onnx": Package("onnx", None),
    "onnxscript": Package("onnxscript", None),
    "onnxruntime": Package("onnxruntime", None),
    "matplotlib": Package("matplotlib", None),
    "tensorrt": Package("tensorrt", "tensorrt", minimum="10.12",
                        reason="strongly typed networks, the only kind TensorRT 11 builds, need TensorRT >= 10.12"),
    "tensorrt_llm": Package("tensorrt_llm", "trtllm", minimum="1.0",
                            reason="the LLM API with the PyTorch flow is TensorRT-LLM 1.x"),
    # Same package, narrower range: trtllm-build and the engine LLM were removed after 1.2.x.
    "tensorrt_llm_engine": Package("tensorrt_llm", "trtllm", minimum="1.0", below="1.3",
                                   reason="trtllm-build and the engine LLM API were removed after 1.2.x; pin "
                                          "tensorrt-llm==1.2.* or use backend tensorrt-llm (PyTorch flow)"),
}


@dataclass(frozen=True)
class Needs:
    packages: tuple[str, ...] = ()     # PACKAGES keys
    gpu: bool = False                  # a CUDA GPU whatever hardware.device says
    executables: tuple[str, ...] = ()  # programs on PATH


# dvc.yaml stage -> what it needs to run. Where a stage's need depends on the configuration (build_engine only
# builds when a backend asks for its engine), the stage says so itself; this is what running it needs.
STAGES: dict[str, Needs] = {
    "weights": Needs(("torch", "transformers")),
    "export_onnx": Needs(("torch", "transformers", "onnx", "onnxscript", "onnxruntime")),
    "export_onnx_half": Needs(("torch", "transformers", "onnx", "onnxscript", "onnxruntime")),
    "calibrate": Needs(("onnx", "onnxruntime")),
    "evaluate": Needs(("torch", "transformers", "onnxruntime")),
    "convert_ft": Needs(("torch",)),
    "convert_trtllm": Needs(("torch",)),
    "verify_parallel": Needs(("torch", "transformers")),
    "build_engine": Needs(("tensorrt", "onnx"), gpu=True),
    "build_trtllm_engine": Needs(("tensorrt_llm_engine",), gpu=True, executables=("trtllm-build",)),
    "benchmark": Needs(("torch",)),
    "serve": Needs(("torch",)),
    "report": Needs(("matplotlib",)),
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int
    capability: tuple[int, int]

    def label(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.memory_bytes / GIB:.1f} GiB, sm_{self.capability[0]}{self.capability[1]})"


@dataclass(frozen=True)
class Environment:
    """What this machine has: module -> version (None = not installed), visible GPUs, program -> path."""

    packages: Mapping[str, Optional[str]]
    gpus: tuple[Gpu, ...] = ()
    executables: Mapping[str, Optional[str]] = field(default_factory=dict)
    no_gpu_reason: str = ""            # why no GPU is visible (CPU build of torch, no driver)


@dataclass(frozen=True)
class Target:
    """What the configuration asks of the machine, for checks beyond packages."""

    device: str = "cpu"                # where it computes (hardware.device, or cuda for a GPU-only backend)
    precision: Optional[str] = None    # precision.name: FP8 needs a compute capability
    gpus: int = 1                      # GPUs used at once (tp x pp for a backend spreading over GPUs)
    weight_bytes: Optional[int] = None  # the model's weights at that precision, all GPUs together
    model: str = ""                    # named in the "too small" reason


def _version(module: str, distributions: Mapping[str, list[str]]) -> Optional[str]:
    """Installed version of a top-level module's distribution, without importing it; None if absent."""
    if importlib.util.find_spec(module) is None:
        return None
    for dist in distributions.get(module, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _gpus() -> tuple[tuple[Gpu, ...], str]:
    import torch

    if not torch.cuda.is_available():
        why = ("torch is a CPU build" if torch.version.cuda is None
               else "torch.cuda.is_available() is False (no GPU or no driver)")
        return (), why
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(i, p.name, int(p.total_memory), (p.major, p.minor)))
    return tuple(gpus), ""


@functools.lru_cache(maxsize=1)
def probe() -> Environment:
    """This machine, read once per process."""
    modules = sorted({p.module for p in PACKAGES.values()})
    programs = sorted({e for n in STAGES.values() for e in n.executables})
    gpus, why = _gpus()
    distributions = importlib.metadata.packages_distributions()
    return Environment({m: _version(m, distributions) for m in modules}, gpus, {e: shutil.which(e) for e in programs}, why)


def _parse(version: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version)
    except InvalidVersion:
        return None


def package_problem(key: str, env: Environment) -> Optional[str]:
    pkg = PACKAGES[key]
    found = env.packages.get(pkg.module)
    if found is None:
        return f"{pkg.module} is not installed: {pkg.install_hint()}"
    if pkg.minimum is None and pkg.below is None:
        return None
    version = _parse(found)
    if version is None:
        return None  # a build without a readable version: let the import decide
    if pkg.minimum and version < _parse(pkg.minimum) or pkg.below and version >= _parse(pkg.below):
        wanted = " and ".join(p for p in (pkg.minimum and f">= {pkg.minimum}", pkg.below and f"< {pkg.below}") if p)
        return f"{pkg.module} {found} is installed, {wanted} is needed ({pkg.reason})"
    return None


def gpu_problem(target: Target, env: Environment) -> Optional[str]:
    """No GPU, too few, too small for the weights, or without FP8, for a target computing on cuda."""
    from pipeline.precision import PRECISIONS

    if not env.gpus:
        return f"no CUDA GPU is visible ({env.no_gpu_reason or 'none found'})"
    if target.gpus > len(env.gpus):
        return (f"parallel.tp x parallel.pp = {target.gpus} GPUs are needed, {len(env.gpus)} visible; lower "
                f"parallel.tp / parallel.pp or run on a larger machine")
    used = env.gpus[:target.gpus]
    precision = PRECISIONS.get(target.precision or "")
    if precision is not None and precision.min_cuda_capability:
        low = [g for g in used if g.capability < precision.min_cuda_capability]
        if low:
            need = ".".join(map(str, precision.min_cuda_capability))
            return (f"precision {precision.name} needs compute capability >= {need} (FP8 tensor cores: Ada, Hopper "
                    f"or newer); {low[0].label()} has {low[0].capability[0]}.{low[0].capability[1]}")
    if target.weight_bytes:
        per_gpu = target.weight_bytes / target.gpus
        small = [g for g in used if per_gpu > WEIGHT_SHARE_OF_GPU * g.memory_bytes]
        if small:
            return (f"{small[0].label()} is too small for {target.model or 'the model'} at {target.precision}: its "
                    f"weights alone take {per_gpu / GIB:.1f} GiB per GPU over {target.gpus} GPU(s); use a smaller "
                    f"precision, more GPUs (parallel.tp / parallel.pp) or a larger GPU")
    return None


def why_not(needs: Needs, env: Environment, target: Optional[Target] = None) -> Optional[str]:
    """The first reason `needs` (computing as `target` says) cannot be met on `env`, or None."""
    for key in needs.packages:
        problem = package_problem(key, env)
        if problem:
            return problem
    for program in needs.executables:
        if not env.executables.get(program):
            return f"{program} is not on PATH (it comes with tensorrt-llm <= 1.2: pip install -e '.[trtllm]')"
    target = target or Target()
    if needs.gpu or target.device == "cuda":
        return gpu_problem(target, env)
    return None


def require(what: str, needs: Needs, target: Optional[Target] = None, env: Optional[Environment] = None) -> None:
    """Raise the one-line reason `what` cannot run here, before it loads or writes anything."""
    problem = why_not(needs, env or probe(), target)
    if problem:
        raise PipelineError(f"{what} cannot run here: {problem} (python -m pipeline doctor lists what can)")

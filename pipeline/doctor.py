"""`python -m pipeline doctor`: for every DVC stage and every backend, whether it can run on this machine under
params.yaml and, if not, why; with the package versions, GPUs and Python found.

The verdicts come from pipeline/requirements.py (why_not) and the backend registry, the same calls the stages
and the benchmark launcher make before they start, so a reason printed here is the line the stage or backend
would fail with. `doctor()` returns plain rows; `render()` draws them as rich tables."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pipeline import paths, requirements
from pipeline.backends.registry import BACKENDS, BackendSpec
from pipeline.benchmark import machine, roofline
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.model.hf_config import SHAPE_KEYS, llama_config
from pipeline.requirements import GIB, PACKAGES, STAGES, Environment, Needs, Target

OK, CANNOT_RUN, NOT_REQUESTED = "ok", "cannot run", "not requested"
DVC_YAML = Path("dvc.yaml")
UNKNOWN_SIZE = "GPU memory not checked: the model size is not known until the weights stage ran"


@dataclass(frozen=True)
class StageRow:
    stage: str
    status: str      # ok | cannot run | not requested
    reason: str      # why not; for not requested, what turns it on and whether its needs would be met
    runnable: bool   # whether this machine meets its needs as configured (once enabled, when not requested)


@dataclass(frozen=True)
class BackendRow:
    backend: str
    status: str      # ok | cannot run | not requested
    benchmark: bool  # listed in benchmark.backends
    serving: bool    # listed in serving.backends
    reason: str
    runnable: bool   # whether it could run under this precision and device, asked for or not


@dataclass(frozen=True)
class PackageRow:
    module: str
    version: Optional[str]  # None = not installed
    extra: Optional[str]    # the pyproject extra that installs it; None = a core dependency
    problem: str            # not installed, or a version outside the range a stage or backend needs; "" = fine


@dataclass(frozen=True)
class Report:
    params: str
    precision: str
    device: str                    # hardware.device
    tp: int
    pp: int
    model: str                     # the model and its weight size at precision.name, or why that is unknown
    weight_bytes: Optional[int]
    stages: list[StageRow]
    backends: list[BackendRow]
    packages: list[PackageRow]
    gpus: list[dict[str, Any]]     # the visible GPUs: index, name, memory_bytes, capability, label
    no_gpu_reason: str             # why none is visible ("" when some are)
    executables: dict[str, Optional[str]]
    python: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def model_shape(cfg: PipelineConfig, weights_dir: Path) -> tuple[Optional[dict[str, Any]], str]:
    """The model's shape (LlamaArgs as a dict) and where it came from: params.yaml when every shape key is set,
    else the weights stage's config.json; (None, why) when neither says."""
    m = cfg.model
    if all(getattr(m, k) is not None for k in SHAPE_KEYS):
        # The Hugging Face config the weights stage writes for a preset, read back as LlamaArgs.
        raw = llama_config(m).to_dict()
        return LlamaArgs.from_hf_config(raw, source="params.yaml model").to_dict(), "params.yaml"
    if not (Path(weights_dir) / "config.json").is_file():
        return None, "not known until the weights stage ran"
    try:
        return machine.model_shape(weights_dir), f"{weights_dir}/config.json"
    except PipelineError as e:  # a damaged config.json: report it, the weights stage will rewrite it
        return None, f"not known ({e})"


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _weights(shape: Optional[dict[str, Any]], precision: str) -> Optional[int]:
    return roofline.stored_weight_bytes(LlamaArgs(**shape), precision) if shape else None


def _needs_text(needs: Needs, target: Target) -> str:
    parts = []
    for key in needs.packages:
        pkg = PACKAGES[key]
        wanted = " and ".join(p for p in (pkg.minimum and f">= {pkg.minimum}", pkg.below and f"< {pkg.below}") if p)
        parts.append(f"{pkg.module} {wanted}".strip())
    parts += list(needs.executables)
    if needs.gpu or target.device == "cuda":
        parts.append("a CUDA GPU" if target.gpus == 1 else f"{target.gpus} CUDA GPUs")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def _verdict(needs: Needs, env: Environment, target: Target) -> tuple[Optional[str], str]:
    """(why it cannot run, or None; a note for a check that could not be made)."""
    problem = requirements.why_not(needs, env, target)
    on_gpu = needs.gpu or target.device == "cuda"
    unchecked = problem is None and on_gpu and target.weight_bytes is None
    return problem, UNKNOWN_SIZE if unchecked else ""


# Engine stages: the backend whose engine each builds. They build only when that backend is asked for and the
# registry declares it able to run precision.name on hardware.device, and check the machine with its target.
ENGINE_STAGES = {"build_engine": "tensorrt", "build_trtllm_engine": "tensorrt-llm-engine"}


def _stage_target(stage: str, cfg: PipelineConfig, shape: Optional[dict[str, Any]]) -> Target:
    """Where a stage computes. Most stages run on the CPU whatever hardware.device says."""
    if stage in ENGINE_STAGES:
        return machine.backend_target(cfg, BACKENDS[ENGINE_STAGES[stage]], shape)
    if stage == "verify_parallel":
        # The TP x PP runner: one rank per GPU on cuda, each holding its share of the converted checkpoint.
        dtype = cfg.convert.resolved_dtype(cfg.precision)
        return Target(cfg.hardware.device, dtype, cfg.parallel.world_size, _weights(shape, dtype), cfg.model.name)
    if stage in ("benchmark", "serve"):
        # The GPU itself; each backend's own target (GPU count, memory) is checked per backend.
        return Target(cfg.hardware.device, cfg.precision.name, 1, None, cfg.model.name)
    return Target()


def _not_requested(cfg: PipelineConfig, stage: str) -> Optional[str]:
    """Why a conditional stage only records that it was not asked for under cfg (the reason it records); None
    when it runs in full."""
    if stage == "export_onnx_half" and cfg.export.half is None:
        return "export.half is null"
    if stage in ENGINE_STAGES:
        return cfg.engine_not_built(ENGINE_STAGES[stage])
    for fmt, name in (("ft", "convert_ft"), ("trtllm", "convert_trtllm")):
        if stage == name and fmt not in cfg.convert.formats:
            return f"convert.formats excludes {fmt}"
    return None


def declared_problems(backend: BackendSpec, precision: str, device: str) -> list[str]:
    """What the registry declares against precision x device, each in cannot_run's words (the first is the line
    the benchmark prints when it skips the backend); a GPU-only backend on the CPU is told to use hardware=cuda."""
    problems = [backend.cannot_run(precision, backend.devices[0]), backend.cannot_run(backend.precisions[0], device)]
    if problems[1] and backend.gpu_only:
        problems[1] += ": it needs hardware=cuda"
    return [p for p in problems if p]


def backend_problems(cfg: PipelineConfig, backend: BackendSpec, shape: Optional[dict[str, Any]],
                     env: Environment) -> list[str]:
    """Why `backend` cannot run under cfg here: what the registry declares first, then this machine."""
    problems = declared_problems(backend, cfg.precision.name, cfg.hardware.device)
    here = machine.environment_problem(cfg, backend, shape, env)
    return problems + [here] if here else problems


def _backend_row(cfg: PipelineConfig, backend: BackendSpec, shape: Optional[dict[str, Any]],
                 env: Environment) -> BackendRow:
    problems = backend_problems(cfg, backend, shape, env)
    target = machine.backend_target(cfg, backend, shape)
    unchecked = not problems and target.device == "cuda" and target.weight_bytes is None
    in_benchmark, in_serving = backend.name in cfg.benchmark.backends, backend.name in cfg.serving.backends
    status = (OK if not problems else CANNOT_RUN) if in_benchmark or in_serving else NOT_REQUESTED
    reason = "; ".join(problems) or (UNKNOWN_SIZE if unchecked else "")
    return BackendRow(backend.name, status, in_benchmark, in_serving, reason, not problems)


def _backends_stage(stage: str, names: list[str], cfg: PipelineConfig, shape: Optional[dict[str, Any]],
                    env: Environment) -> tuple[str, str]:
    """(status, reason) of benchmark / serve from their backends, as the launcher plans them: a backend the
    registry declares unable for this precision x device is skipped and recorded; one it declares able but this
    machine cannot run stops the stage (launcher.plan raises); the stage needs at least one backend to run."""
    key = "benchmark.backends" if stage == "benchmark" else "serving.backends"
    if not names:
        return NOT_REQUESTED, f"{key} is empty"
    runs, skipped, failing = [], [], []
    for name in names:
        backend = BACKENDS[name]
        declared = backend.cannot_run(cfg.precision.name, cfg.hardware.device)
        if declared:
            skipped.append(f"{name} ({declared})")
            continue
        problem = machine.environment_problem(cfg, backend, shape, env)
        if problem:
            failing.append(f"backend {name} cannot run here: {problem}")
        else:
            runs.append(name)
    if failing:
        return CANNOT_RUN, "; ".join(failing)
    if not runs:
        return CANNOT_RUN, f"no backend of {key} can run here: " + "; ".join(skipped)
    return OK, f"runs {', '.join(runs)}" + (f"; skips {'; '.join(skipped)}" if skipped else "")


def _stage_row(stage: str, cfg: PipelineConfig, shape: Optional[dict[str, Any]], env: Environment) -> StageRow:
    needs = STAGES[stage]
    target = _stage_target(stage, cfg, shape)
    problem, note = _verdict(needs, env, target)
    off = _not_requested(cfg, stage)
    if off:
        needed = f"{off}; enabling it needs {_needs_text(needs, target)}"
        met = f", which this machine has{f' ({note})' if note else ''}" if problem is None else f"; here {problem}"
        return StageRow(stage, NOT_REQUESTED, needed + met, problem is None)
    if problem:
        return StageRow(stage, CANNOT_RUN, problem, False)
    if stage in ("benchmark", "serve"):
        names = list(cfg.benchmark.backends if stage == "benchmark" else cfg.serving.backends)
        status, reason = _backends_stage(stage, names, cfg, shape, env)
        return StageRow(stage, status, reason, status != CANNOT_RUN)
    return StageRow(stage, OK, note, True)


def stage_order(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """STAGES in dvc.yaml's order; stages dvc.yaml does not (yet) list follow in STAGES' order."""
    try:
        listed = list((yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {}))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # an unreadable dvc.yaml only loses the order
        listed = []
    return [s for s in listed if s in STAGES] + [s for s in STAGES if s not in listed]


def package_rows(env: Environment) -> list[PackageRow]:
    """One row per module (tensorrt_llm is two PACKAGES entries: the PyTorch flow and the engine range)."""
    rows: dict[str, PackageRow] = {}
    for key, pkg in PACKAGES.items():
        problem = requirements.package_problem(key, env) or ""
        row = rows.get(pkg.module)
        if row is None:
            rows[pkg.module] = PackageRow(pkg.module, env.packages.get(pkg.module), pkg.extra, problem)
        elif problem and problem not in row.problem:
            rows[pkg.module] = dataclasses.replace(row, problem="; ".join(p for p in (row.problem, problem) if p))
    return list(rows.values())


def doctor(cfg: PipelineConfig, env: Optional[Environment] = None, params: str = str(paths.PARAMS),
           weights_dir: Path = paths.WEIGHTS_DIR, dvc_yaml: Path = DVC_YAML) -> Report:
    """Every stage and backend under cfg on `env` (default: this machine, requirements.probe())."""
    env = env or requirements.probe()
    shape, source = model_shape(cfg, weights_dir)
    weights = _weights(shape, cfg.precision.name)
    model = (f"{cfg.model.name}: {_size(weights)} of weights at {cfg.precision.name} (shape from {source})"
             if weights else f"{cfg.model.name}: size {source}")
    return Report(
        params=params, precision=cfg.precision.name, device=cfg.hardware.device, tp=cfg.parallel.tp,
        pp=cfg.parallel.pp, model=model, weight_bytes=weights,
        stages=[_stage_row(s, cfg, shape, env) for s in stage_order(dvc_yaml)],
        backends=[_backend_row(cfg, b, shape, env) for b in BACKENDS.values()],
        packages=package_rows(env),
        gpus=[{**dataclasses.asdict(g), "label": g.label()} for g in env.gpus], no_gpu_reason="" if env.gpus else env.no_gpu_reason or "none found",
        executables=dict(env.executables), python=platform.python_version(),
    )


_STYLE = {OK: "green", CANNOT_RUN: "red", NOT_REQUESTED: "yellow"}


def _status(status: str) -> Text:
    return Text(status, style=_STYLE[status])


def render(report: Report) -> Group:
    """Rich tables: stages, backends, then what was found (packages, GPUs, programs, Python). Cells are Text, not
    markup: '.[tensorrt]' is an extra, not a style tag."""
    header = Text(f"{report.params}: model {report.model}; precision {report.precision}, hardware.device "
                  f"{report.device}, parallel.tp x pp {report.tp} x {report.pp}")
    stages = Table(title="Stages (dvc.yaml)", title_justify="left")
    stages.add_column("stage", no_wrap=True)
    stages.add_column("status", no_wrap=True)
    stages.add_column("reason", overflow="fold")
    for s in report.stages:
        stages.add_row(s.stage, _status(s.status), Text(s.reason))
    backends = Table(title="Backends", title_justify="left")
    backends.add_column("backend", no_wrap=True)
    backends.add_column("status", no_wrap=True)
    backends.add_column("benchmark", no_wrap=True)
    backends.add_column("serving", no_wrap=True)
    backends.add_column("reason", overflow="fold")
    for b in report.backends:
        backends.add_row(b.backend, _status(b.status), "yes" if b.benchmark else "-", "yes" if b.serving else "-",
                         Text(b.reason))
    packages = Table(title="Found", title_justify="left")
    packages.add_column("package", no_wrap=True)
    packages.add_column("version", no_wrap=True)
    packages.add_column("extra", no_wrap=True)
    packages.add_column("problem", overflow="fold")
    for p in report.packages:
        packages.add_row(p.module, p.version or Text("not installed", style="red"),
                         Text(f".[{p.extra}]" if p.extra else "core"), Text(p.problem))
    gpus = "; ".join(g["label"] for g in report.gpus) if report.gpus else f"none visible ({report.no_gpu_reason})"
    programs = "; ".join(f"{name}: {path or 'not on PATH'}" for name, path in report.executables.items())
    found = Text(f"GPUs: {gpus}\nprograms: {programs or '-'}\npython: {report.python}")
    return Group(header, stages, backends, packages, found)

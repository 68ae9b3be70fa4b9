"""ONNX decoder -> TensorRT engine (TensorRT >= 10.12 and 11; written against their Python API, never run here).

Strongly typed only: the network takes every tensor's type from the ONNX graph, so the precision is chosen by
choosing the graph (SOURCES), and no precision flag is set (TensorRT 11 removed them; 10.12+ deprecates them).
INT8 is the explicit Q/DQ of the calibrate stage's graph, with no calibrator. `settings()` turns the `tensorrt`
params section into plain data (tested without TensorRT); `build()` hands that data to the library."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline import artifacts
from pipeline.engines.profiles import input_shapes
from pipeline.errors import PipelineError
from pipeline.progress import console

# precision.name -> the ONNX artifact (pipeline.paths.ARTIFACTS kind) whose graph carries that precision.
SOURCES = {"fp32": "onnx", "fp16": "onnx_half", "bf16": "onnx_half", "int8": "onnx_int8"}
PLAN_FILE = "model.plan"
LAYERS_FILE = "layers.json"   # the engine inspector's JSON: which layers fused, their tactics and precisions
GIB = 1 << 30
Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildSettings:
    onnx: Path
    workspace_bytes: int
    optimization_level: int
    # profile name -> graph input -> (min, opt, max) shape, in profile-index order
    profiles: dict[str, dict[str, tuple[Shape, Shape, Shape]]]
    set_flags: tuple[str, ...]       # BuilderFlag members to set
    clear_flags: tuple[str, ...]     # BuilderFlag members to clear (TF32 is on by default)
    profiling_verbosity: str         # ProfilingVerbosity member
    hardware_compatibility: str      # HardwareCompatibilityLevel member
    max_aux_streams: Optional[int] = None
    timing_cache: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest as built


def settings(section: Mapping[str, Any], onnx: Path, *, num_layers: int, kv_heads: int, head_dim: int,
             timing_cache: Optional[Path]) -> BuildSettings:
    """The `tensorrt` params section (pipeline/config.py TensorRTConfig, as a dict) as builder settings."""
    flags = []
    if section["refit"]:
        flags.append("REFIT")
    if section["strip_plan"]:
        flags.append("STRIP_PLAN")
    if section["weight_streaming"]:
        flags.append("WEIGHT_STREAMING")
    profiles = {name: input_shapes(dims, num_layers, kv_heads, head_dim) for name, dims in section["profiles"].items()}
    return BuildSettings(
        onnx=Path(onnx), workspace_bytes=int(section["workspace_gib"] * GIB),
        optimization_level=int(section["optimization_level"]), profiles=profiles, set_flags=tuple(flags),
        clear_flags=() if section["tf32"] else ("TF32",),
        # The params values are the enum members' names in lower case (pipeline/config.py lists them).
        profiling_verbosity=section["profiling_verbosity"].upper(),
        hardware_compatibility=section["hardware_compatibility"].upper(),
        max_aux_streams=section["max_aux_streams"], timing_cache=Path(timing_cache) if section["timing_cache"] and
        timing_cache else None)


def check_source(manifest: Mapping[str, Any], where: Path, precision: str) -> None:
    """The ONNX graph must carry `precision`: a strongly typed network builds exactly what the graph says."""
    if manifest.get("skipped"):
        raise PipelineError(f"{where}: not exported ({manifest.get('reason')}); set export.half={precision} and "
                            f"rerun dvc repro")
    if precision in ("fp16", "bf16") and manifest.get("precision") != precision:
        raise PipelineError(f"{where}: a {manifest.get('precision')} graph, precision.name is {precision}; set "
                            f"export.half={precision} and rerun dvc repro")


def timing_cache_path(cache_dir: Path, gpu_name: str, trt_version: str) -> Path:
    """One cache per GPU model and TensorRT version: entries are only valid for the pair that timed them."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return Path(cache_dir) / f"{slug}-trt{trt_version}.cache"


def _logger(trt, log_path: Path):
    """A TensorRT logger writing every message to the build log and warnings and errors to the console."""
    severity = trt.ILogger.Severity
    loud = {severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING}

    class FileLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.file = open(log_path, "a", encoding="utf-8")

        def log(self, level, msg):
            self.file.write(f"[{level.name}] {msg}\n")
            if level in loud:
                console.print(f"[yellow]TensorRT {level.name.lower()}:[/yellow] {msg}", highlight=False)

    return FileLogger()


def _progress_monitor(trt):
    """Build phases printed as they start and finish: a large engine builds for many minutes."""
    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                console.print(f"TensorRT build: {phase_name} ({num_steps} steps)", highlight=False)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            took = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            if took > 5:
                console.print(f"TensorRT build: {phase_name} done in {took:.0f} s", highlight=False)

    return Progress()


def _parse(trt, network, logger, onnx: Path, log_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx)):  # by path: external weights next to the file are found
        return
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    for e in errors:
        logger.log(trt.ILogger.Severity.ERROR, f"ONNX parser: node {e.node()} {e.node_name()!r} "
                                               f"({e.node_operator()}): {e.desc()}")
    first = errors[0] if errors else None
    where = f" at node {first.node_name()!r} ({first.node_operator()}): {first.desc()}" if first else ""
    raise PipelineError(f"{onnx}: TensorRT's ONNX parser rejected the graph{where}; every error is in {log_path}")


def _configure(trt, builder, s: BuildSettings):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_bytes)
    config.builder_optimization_level = s.optimization_level
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, s.profiling_verbosity)
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, s.hardware_compatibility)
    if s.max_aux_streams is not None:
        config.max_aux_streams = s.max_aux_streams
    for flag in s.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in s.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    for shapes in s.profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    return config


def layer_summary(layers_json: str) -> dict[str, Any]:
    """Counts from the inspector's JSON: layers after fusion and, with detailed verbosity, by layer type."""
    info = json.loads(layers_json)
    layers = info.get("Layers", [])
    types: dict[str, int] = {}
    for layer in layers:
        if isinstance(layer, dict):
            kind = layer.get("LayerType", "unknown")
            types[kind] = types.get(kind, 0) + 1
    return {"engine_layers": len(layers), "layer_types": dict(sorted(types.items()))}


def build(trt, s: BuildSettings, out_dir: Path, log_path: Path) -> dict[str, Any]:
    """Build the engine into out_dir (PLAN_FILE, LAYERS_FILE); update the timing cache; return metrics. Every
    TensorRT message goes to log_path, which outlives a failed build (out_dir does not)."""
    out_dir, log_path = Path(out_dir), Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    logger = _logger(trt, log_path)
    try:
        builder = trt.Builder(logger)
        # Symbolic: the flag's value changed in TensorRT 11 (where it is ignored, strong typing being the only mode).
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        _parse(trt, network, logger, s.onnx, log_path)
        config = _configure(trt, builder, s)
        config.progress_monitor = _progress_monitor(trt)
        cache_entries_before = None
        if s.timing_cache is not None:
            blob = s.timing_cache.read_bytes() if s.timing_cache.is_file() else b""
            cache_entries_before = len(blob)
            config.set_timing_cache(config.create_timing_cache(blob), False)  # False: a mismatched cache is an error
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t0
        if plan is None:
            raise PipelineError(f"TensorRT could not build an engine from {s.onnx} (build_serialized_network returned "
                                f"None); TensorRT's reason is in {log_path}")
        (out_dir / PLAN_FILE).write_bytes(memoryview(plan))
        if s.timing_cache is not None:
            s.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            artifacts.atomic_write_bytes(s.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise PipelineError(f"TensorRT built a plan from {s.onnx} but cannot load it back; see {log_path}")
        inspector = engine.create_engine_inspector()
        layers_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        (out_dir / LAYERS_FILE).write_text(layers_json)
        return {"build_s": round(build_s, 2), "plan_bytes": (out_dir / PLAN_FILE).stat().st_size,
                "timing_cache_bytes_before": cache_entries_before,
                "device_memory_bytes": int(getattr(engine, "device_memory_size_v2", 0)), **layer_summary(layers_json)}
    finally:
        logger.file.close()


def build_artifact(trt, s: BuildSettings, out_dir: Path, log_path: Path, *, precision: str, source: Path,
                   source_manifest: Mapping[str, Any], shape: Mapping[str, Any], profiles: Mapping[str, Any],
                   strip_plan: bool, gpu: str, capability: tuple[int, int]) -> dict[str, Any]:
    """build() into out_dir, then the manifest the tensorrt backend reads (pipeline/backends/tensorrt.py):
    precision, profiles in index order, the KV cache's shape and dtype, where a stripped plan refits from."""
    metrics = build(trt, s, out_dir, log_path)
    # The past/present tensors carry the graph's float type: fp16/bf16 for the half export, fp32 otherwise
    # (the INT8 graph quantizes only its MatMuls).
    kv_dtype = source_manifest.get("dtype", "float32") if precision in ("fp16", "bf16") else "float32"
    return artifacts.write_manifest(
        out_dir, kind="trt-engine", precision=precision, source=Path(source).as_posix(),
        source_manifest_sha256=artifacts.sha256_file(Path(source) / artifacts.MANIFEST), profiles=dict(profiles),
        num_layers=shape["num_layers"], kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
        kv_dtype=kv_dtype, strip_plan=strip_plan, refit_source=s.onnx.as_posix(), tensorrt_version=trt.__version__,
        gpu=gpu, compute_capability=list(capability), flags=list(s.set_flags), metrics=metrics)

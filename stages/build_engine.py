"""Stage `build_engine`: the ONNX decoder of precision.name -> artifacts/trt_engine (TensorRT plan, inspector
layer JSON) with a persisted timing cache. It builds only when a backend asks for the engine (tensorrt in
benchmark.backends or serving.backends) and can run precision.name; otherwise it records why it did not.
Without TensorRT or a GPU it fails at once with doctor's reason, before writing anything."""

from pipeline import artifacts, config, paths, requirements, tracking
from pipeline.artifacts import atomic_write_json
from pipeline.backends.registry import spec
from pipeline.benchmark import machine
from pipeline.convert import skip
from stages._main import run

BACKEND = "tensorrt"
CACHE_README = ("TensorRT timing caches of stage build_engine, one per GPU model and TensorRT version "
                "(<gpu>-trt<version>.cache). A persisted DVC output: kept across builds, so a rebuild times only "
                "the layers it has not seen.\n")


def _timing_cache_dir() -> None:
    # DVC needs the (persisted) output to exist even when nothing was built or timed.
    paths.TIMING_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    (paths.TIMING_CACHE_DIR / "README.txt").write_text(CACHE_README)


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("build_engine", cfg) as stage:
        backend = spec(BACKEND)
        why = cfg.engine_not_built(BACKEND)
        if why:
            skip.write_not_built(paths.ENGINE_DIR, paths.ENGINE_METRICS, paths.ENGINE_LOG, "tensorrt", "trt-engine", why)
            _timing_cache_dir()
            return
        artifacts.verify_manifest(paths.WEIGHTS_DIR)  # before model_shape reads its config.json
        shape = machine.model_shape(paths.WEIGHTS_DIR)
        requirements.require("stage build_engine", requirements.STAGES["build_engine"],
                             machine.backend_target(cfg, backend, shape))
        import tensorrt as trt
        import torch

        from pipeline.engines import trt_build

        source = paths.ARTIFACTS[trt_build.SOURCES[cfg.precision.name]]
        manifest = artifacts.verify_manifest(source.path)
        trt_build.check_source(manifest, source.path, cfg.precision.name)
        gpu = torch.cuda.get_device_name(0)
        settings = trt_build.settings(
            cfg.dataclass_dict("tensorrt"), source.path / "model.onnx", num_layers=shape["num_layers"],
            kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
            timing_cache=trt_build.timing_cache_path(paths.TIMING_CACHE_DIR, gpu, trt.__version__))
        with artifacts.atomic_dir(paths.ENGINE_DIR) as tmp:
            manifest = trt_build.build_artifact(
                trt, settings, tmp, paths.ENGINE_LOG, precision=cfg.precision.name, source=source.path,
                source_manifest=manifest, shape=shape, profiles=cfg.tensorrt.profiles,
                strip_plan=cfg.tensorrt.strip_plan, gpu=gpu, capability=torch.cuda.get_device_capability(0))
        metrics = manifest["metrics"]
        _timing_cache_dir()
        atomic_write_json(paths.ENGINE_METRICS, metrics)
        stage.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        stage.log_manifest(paths.ENGINE_DIR)
        stage.log_artifact(paths.ENGINE_LOG, "build_engine")
        stage.set_tags({"tensorrt": trt.__version__, "gpu": gpu, "precision": cfg.precision.name})


if __name__ == "__main__":
    run(main)

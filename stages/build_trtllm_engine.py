"""Stage `build_trtllm_engine`: the convert_trtllm checkpoint -> artifacts/trtllm_engine by trtllm-build
(TensorRT-LLM <= 1.2). It builds only when backend tensorrt-llm-engine is asked for and can run precision.name,
and records why not otherwise. Without TensorRT-LLM 1.2, trtllm-build or enough GPUs it fails at once with
doctor's reason, before writing anything."""

from pipeline import artifacts, config, paths, requirements, tracking
from pipeline.artifacts import atomic_write_json
from pipeline.backends.registry import spec
from pipeline.benchmark import machine
from pipeline.convert import skip
from stages._main import run

BACKEND = "tensorrt-llm-engine"


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("build_trtllm_engine", cfg) as stage:
        backend = spec(BACKEND)
        why = cfg.engine_not_built(BACKEND)
        if why:
            skip.write_not_built(paths.TRTLLM_ENGINE_DIR, paths.TRTLLM_ENGINE_METRICS, paths.TRTLLM_ENGINE_LOG, "trtllm",
                                 "trtllm-engine", why)
            return
        artifacts.verify_manifest(paths.WEIGHTS_DIR)  # before model_shape reads its config.json
        shape = machine.model_shape(paths.WEIGHTS_DIR)
        requirements.require("stage build_trtllm_engine", requirements.STAGES["build_trtllm_engine"],
                             machine.backend_target(cfg, backend, shape))
        from pipeline.engines import trtllm_build

        manifest = artifacts.verify_manifest(paths.TRTLLM_DIR)
        trtllm_build.check_checkpoint(manifest, paths.TRTLLM_DIR, cfg.precision.name, cfg.parallel.tp, cfg.parallel.pp)
        with artifacts.atomic_dir(paths.TRTLLM_ENGINE_DIR) as tmp:
            args = trtllm_build.command(cfg.dataclass_dict("trtllm")["build"], paths.TRTLLM_DIR, tmp,
                                        cfg.parallel.world_size)
            metrics = trtllm_build.build(args, paths.TRTLLM_ENGINE_LOG)
            artifacts.write_manifest(
                tmp, kind="trtllm-engine", precision=cfg.precision.name, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                source=paths.TRTLLM_DIR.as_posix(),
                source_manifest_sha256=artifacts.sha256_file(paths.TRTLLM_DIR / artifacts.MANIFEST),
                build=cfg.dataclass_dict("trtllm")["build"], tensorrt_llm_version=requirements.probe().packages.get(
                    "tensorrt_llm"), metrics=metrics)
        atomic_write_json(paths.TRTLLM_ENGINE_METRICS, metrics)
        stage.log_metrics(metrics)
        stage.log_manifest(paths.TRTLLM_ENGINE_DIR)
        stage.log_artifact(paths.TRTLLM_ENGINE_LOG, "build_trtllm_engine")


if __name__ == "__main__":
    run(main)

"""Stage `convert_trtllm`: HF weights -> TensorRT-LLM checkpoint (config.json + rank{r}.safetensors)."""

from pipeline import artifacts, config, paths, tracking
from pipeline.convert import skip
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("convert_trtllm", cfg) as stage:
        if "trtllm" not in cfg.convert.formats:
            manifest = skip.write_skipped(paths.TRTLLM_DIR, "trtllm", "convert.formats excludes trtllm")
        else:
            artifacts.verify_manifest(paths.WEIGHTS_DIR)
            from pipeline.convert import trtllm

            manifest = trtllm.convert(paths.WEIGHTS_DIR, paths.TRTLLM_DIR, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                                      dtype=cfg.convert.resolved_dtype(cfg.precision), quant=cfg.convert.trtllm_quant)
        stage.log_manifest(paths.TRTLLM_DIR)
        stage.set_tags({"format": "trtllm", "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                        "skipped": bool(manifest.get("skipped"))})


if __name__ == "__main__":
    run(main)

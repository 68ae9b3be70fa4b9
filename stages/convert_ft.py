"""Stage `convert_ft`: HF weights -> FasterTransformer `<tp>-gpu/` folder for parallel.tp x parallel.pp."""

from pipeline import artifacts, config, paths, tracking
from pipeline.convert import skip
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("convert_ft", cfg) as stage:
        if "ft" not in cfg.convert.formats:
            manifest = skip.write_skipped(paths.FT_DIR, "ft", "convert.formats excludes ft")
        else:
            artifacts.verify_manifest(paths.WEIGHTS_DIR)
            from pipeline.convert import ft

            manifest = ft.convert(paths.WEIGHTS_DIR, paths.FT_DIR, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                                  dtype=cfg.convert.resolved_dtype(cfg.precision),
                                  int8_mode=cfg.convert.ft_int8_mode)
        stage.log_manifest(paths.FT_DIR)
        stage.set_tags({"format": "ft", "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                        "skipped": bool(manifest.get("skipped"))})


if __name__ == "__main__":
    run(main)

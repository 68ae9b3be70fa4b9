"""Stage `evaluate`: perplexity, top-1 agreement and KL of every artifact vs the HF fp32 reference."""

from pipeline import artifacts, config, paths, tracking
from pipeline.artifacts import atomic_write_json
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("evaluate", cfg) as stage:
        from pipeline.evaluate import Gate, evaluate

        g = cfg.evaluate.gate
        for read in (paths.WEIGHTS_DIR, paths.ONNX_DIR, paths.INT8_DIR):
            artifacts.verify_manifest(read)
        onnx_models = {"onnx_fp32": paths.ONNX_DIR / "model.onnx", "onnx_int8": paths.INT8_DIR / "model.onnx"}
        half = artifacts.verify_manifest(paths.ONNX_HALF_DIR)
        if not half.get("skipped"):  # export.half: the fp16/bf16 graph TensorRT builds from
            precision = artifacts.manifest_field(paths.ONNX_HALF_DIR, half, "precision", str)
            onnx_models[f"onnx_{precision}"] = paths.ONNX_HALF_DIR / "model.onnx"
        result = evaluate(paths.WEIGHTS_DIR, onnx_models=onnx_models,
                          torch_precisions=tuple(cfg.evaluate.torch_precisions),
                          gate=Gate(g.max_ppl_delta_pct, g.min_top1, g.mode),
                          seq_len=cfg.evaluate.seq_len, max_sequences=cfg.evaluate.max_sequences)
        metrics = {**result["metrics"], "reference_ppl": result["reference_ppl"],
                   "scored_positions": result["scored_positions"]}
        atomic_write_json(paths.EVALUATE_METRICS, metrics)
        stage.log_metrics(metrics)
        stage.log_artifact(paths.EVALUATE_METRICS, "evaluate")
        stage.set_tags({"evaluate.text": result["text"]})


if __name__ == "__main__":
    run(main)

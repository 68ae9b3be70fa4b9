"""The short metrics file `dvc exp show` and MLflow show by default: metrics/headline.json.

Shape (per backend; the accuracy delta is per backend because it belongs to the artifact the backend
ran, not to a scenario):

    {"<backend>": {"ppl_delta_pct": float,                      # absent when no evaluated artifact matches
                   "<scenario>": {"ttft_ms_p50": float, "tpot_ms_p50": float, "output_token_throughput": float}},
     "<failed backend>": {"failed": "why its worker crashed or timed out"}}

Imported by tracking code, so this module stays light: no matplotlib, no torch.
"""

from __future__ import annotations

from typing import Any

from pipeline.backends.registry import BACKENDS

# Per scenario: latency medians in ms, throughput in output tokens/s (copied from metrics/benchmark.json).
SCENARIO_METRICS: tuple[str, ...] = ("ttft_ms_p50", "tpot_ms_p50", "output_token_throughput")
# Per backend: perplexity change in % of the artifact it ran vs Hugging Face fp32 (metrics/evaluate.json).
ACCURACY_METRIC = "ppl_delta_pct"
HEADLINE_METRICS: tuple[str, ...] = (*SCENARIO_METRICS, ACCURACY_METRIC)

# Artifact kind (pipeline/paths.py ARTIFACTS) -> the metrics/evaluate.json entry that scores it. The converted
# checkpoints hold the Hugging Face weights bit for bit (verify_parallel checks the runner on them), so the
# torch entry at the same precision scores them too.
_EVALUATED = {"hf_weights": "torch_{precision}", "trtllm_checkpoint": "torch_{precision}",
              "ft_checkpoint": "torch_{precision}", "onnx": "onnx_fp32", "onnx_int8": "onnx_int8"}


def evaluated_artifact(backend: str, precision: str | None) -> str | None:
    """The metrics/evaluate.json key scoring what `backend` ran at `precision` (its registry entry says which
    artifact that is), or None if none applies."""
    spec = BACKENDS.get(backend)
    if precision is None or spec is None or precision not in spec.precisions:
        return None
    template = _EVALUATED.get(spec.artifact_for(precision))
    return template.format(precision=precision) if template else None


def _round(value: float) -> float:
    # evaluate.json keeps full float precision; 4 significant digits keep `dvc exp show` columns narrow.
    return float(f"{value:.4g}")


def headline(benchmark: dict[str, Any], conditions: dict[str, Any],
             evaluation: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """metrics/headline.json content from benchmark.json, benchmark_conditions.json and evaluate.json."""
    out: dict[str, dict[str, Any]] = {}
    for backend, scenarios in benchmark.items():
        entry: dict[str, Any] = {}
        artifact = evaluated_artifact(backend, conditions.get(backend, {}).get("precision"))
        scored = (evaluation or {}).get(artifact) if artifact else None
        if isinstance(scored, dict) and ACCURACY_METRIC in scored:
            entry[ACCURACY_METRIC] = _round(scored[ACCURACY_METRIC])
        for key, summary in scenarios.items():
            if isinstance(summary, dict):  # skips backend-level numbers such as load_s
                entry[key] = {name: summary[name] for name in SCENARIO_METRICS}
        out[backend] = entry
    # A backend whose worker crashed or timed out has no numbers; its reason shows where they would be.
    out.update({b: {"failed": c["failed"]} for b, c in conditions.items() if isinstance(c, dict) and "failed" in c})
    return out


"""Stage `report`: a markdown summary and PNG plots built from the metrics files."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.benchmark.results import read_runs
from pipeline.errors import PipelineError


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def _plot_latency(metrics: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    backends = list(metrics)
    for ax, name, label in ((axes[0], "ttft_ms", "time to first token (ms)"),
                            (axes[1], "tpot_ms", "time per output token (ms)")):
        scenarios = [k for k in metrics[backends[0]] if isinstance(metrics[backends[0]][k], dict)]
        x = np.arange(len(scenarios))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            p50 = [metrics[backend][s][f"{name}_p50"] for s in scenarios]
            p99 = [metrics[backend][s][f"{name}_p99"] for s in scenarios]
            bars = ax.bar(x + i * width, p50, width, label=f"{backend} p50")
            ax.scatter(x + i * width, p99, marker="_", s=300, linewidths=2.5, color="black", zorder=3,
                       label=f"{backend} p99" if i == 0 else None)
        ax.set_xticks(x + width * (len(backends) - 1) / 2, scenarios, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency per scenario (bars: p50, dashes: p99)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_throughput(metrics: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend, scenarios in metrics.items():
        by_prompt: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for key, s in scenarios.items():
            if isinstance(s, dict):
                batch, prompt = int(key.split("_")[0][2:]), int(key.split("_")[1][2:])
                by_prompt[prompt].append((batch, s["output_token_throughput"]))
        for prompt, points in sorted(by_prompt.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend}, prompt {prompt}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Output token throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_tpot_distribution(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[f"{r['backend']}\n{r['scenario']}"].append(r["tpot_ms"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.5))
    ax.boxplot(list(groups.values()), tick_labels=list(groups), showfliers=True)
    ax.set_ylabel("time per output token (ms)")
    ax.set_title("TPOT over measured runs")
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _fmt(v: float) -> str:
    return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"


def _verify_section(verify: dict[str, Any]) -> list[str]:
    layout = verify.get("layout", {})
    lines = [f"## Tensor/pipeline-parallel checkpoints (tp={layout.get('tp')}, pp={layout.get('pp')})", "",
             "Each converted checkpoint re-run by the project's TP x PP torch runner (torchrun) against Hugging "
             "Face fp32 on the same prompts.", "",
             "| format | logits max-abs-diff | top-1 agreement | greedy tokens identical | gate |", "|---|---|---|---|---|"]
    for fmt, m in verify.items():
        if fmt == "layout":
            continue
        lines.append(f"| {fmt} | {m['logits_max_abs_diff']:.3g} | {m['top1_agreement']:.4f} "
                     f"| {'yes' if m['generation_token_exact'] else 'no'} | {'pass' if m['gate_pass'] else 'FAIL'} |")
    return lines + [""]


def _markdown(metrics: dict[str, Any], conditions: dict[str, Any], weights: dict[str, Any],
              manifest: dict[str, Any], plots: list[str], verify: dict[str, Any] | None = None) -> str:
    lines = ["# Llama 3 inference report", ""]
    lines += [f"- model: **{manifest.get('model')}** ({manifest.get('source')}), "
              f"{manifest.get('parameter_count', 0):,} parameters, stored as {manifest.get('dtype')}"]
    if manifest.get("source") == "hub":
        lines.append(f"- hub: `{manifest['hub_id']}` @ `{manifest.get('resolved_revision')}`")
    if weights:
        lines.append(f"- weights stage: {_fmt(weights.get('bytes', 0) / 2**20)} MiB written in "
                     f"{_fmt(weights.get('seconds', 0))} s")
    lines.append("")
    for backend, scenarios in metrics.items():
        cond = conditions.get(backend, {})
        lines += [f"## Backend `{backend}`", "",
                  f"device `{cond.get('device')}`, precision `{cond.get('precision')}`, {cond.get('decoding')} "
                  f"decoding, {cond.get('batching')} batches, EOS ignored: {cond.get('ignore_eos')}, "
                  f"{cond.get('warmup_runs')} warm-up + {cond.get('measured_runs')} measured runs per scenario, "
                  f"percentiles: numpy `{cond.get('percentile_method')}`, memory: `{cond.get('memory_method')}`, "
                  f"load time {_fmt(scenarios.get('load_s', 0))} s.", "",
                  "| scenario | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | E2E p50 (ms) | output tok/s | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for key, s in scenarios.items():
            if not isinstance(s, dict):
                continue
            lines.append(f"| {key} | {_fmt(s['ttft_ms_p50'])} / {_fmt(s['ttft_ms_p90'])} / {_fmt(s['ttft_ms_p99'])} "
                         f"| {_fmt(s['tpot_ms_p50'])} / {_fmt(s['tpot_ms_p90'])} / {_fmt(s['tpot_ms_p99'])} "
                         f"| {_fmt(s['e2el_ms_p50'])} | {_fmt(s['output_token_throughput'])} "
                         f"| {_fmt(s['peak_memory_mb'])} |")
        lines.append("")
    if verify:
        lines += _verify_section(verify)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Definitions: TTFT = first token time - send time; TPOT = (E2E - TTFT) / (N - 1); "
              "output tok/s = tokens produced / summed end-to-end time of the measured runs.", ""]
    return "\n".join(lines)


def build(metrics_path: Path, conditions_path: Path, runs_path: Path, weights_metrics_path: Path,
          weights_dir: Path, out_dir: Path, verify_path: Path | None = None) -> dict[str, Any]:
    from pipeline import artifacts

    metrics = _read_json(metrics_path)
    conditions = _read_json(conditions_path)
    weights = _read_json(weights_metrics_path)
    manifest = artifacts.read_manifest(weights_dir)
    verify = _read_json(verify_path) if verify_path is not None else None
    rows = read_runs(runs_path)
    if not metrics or not rows:
        raise PipelineError(f"{metrics_path}: no benchmark results to report")
    plots = ["latency.png", "throughput.png", "tpot_distribution.png"]
    with artifacts.atomic_dir(out_dir) as tmp:
        _plot_latency(metrics, tmp / plots[0])
        _plot_throughput(metrics, tmp / plots[1])
        _plot_tpot_distribution(rows, tmp / plots[2])
        (tmp / "report.md").write_text(_markdown(metrics, conditions, weights, manifest, plots, verify))
    return {"files": ["report.md", *plots]}

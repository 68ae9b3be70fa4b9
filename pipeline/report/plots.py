"""What the report draws: one function per PNG, each taking the series computed in `tables`.

Imported only when the report is built (see `build`), so `pipeline.report.headline` stays free of
matplotlib. The Agg backend renders to files without a display (CI, GPU hosts over ssh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from pipeline.report import pareto, tables  # noqa: E402

DPI = 110


def _save(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def latency(table: list[dict[str, Any]], out: Path) -> None:
    """TTFT (left) and TPOT (right) per scenario and backend: bar = p50, dash = p99; dash far above bar = long tail."""
    scenarios = tables.scenario_order(table)
    names = tables.backends(table)
    x = np.arange(len(scenarios))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "ttft_ms", "time to first token (ms)"),
                              (axes[1], "tpot_ms", "time per output token (ms)")):
        p50, p99 = tables.by_scenario(table, f"{metric}_p50"), tables.by_scenario(table, f"{metric}_p99")
        for i, backend in enumerate(names):
            ax.bar(x + i * width, p50[backend], width, label=f"{backend} p50")
            ax.scatter(x + i * width, p99[backend], marker="_", s=300, linewidths=2.5, color="black", zorder=3,
                       label="p99" if i == 0 else None)
        ax.set_xticks(x + width * (len(names) - 1) / 2, scenarios, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency per scenario (bars: p50, dashes: p99)")
    _save(fig, out)


def roofline(table: list[dict[str, Any]], titles: dict[str, str], out: Path) -> None:
    """Decode: TPOT p50 (bar) vs roofline bound (grey) per scenario; label = bound / TPOT, 100 % = at the roofline."""
    panels = tables.roofline_panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.6 * len(panels)), 4.8), squeeze=False)
    for ax, (backend, panel) in zip(axes[0], panels.items()):
        x = np.arange(len(panel["scenario"]))
        bars = ax.bar(x - 0.2, panel["tpot_ms_p50"], 0.4, label="TPOT p50 (measured)")
        ax.bar(x + 0.2, panel["decode_bound_ms"], 0.4, color="tab:gray", label="decode bound (roofline)")
        for bar, pct in zip(bars, panel["roofline_pct"]):
            ax.annotate(f"{pct:.3g} %", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        # Log scale: a launch-bound backend can be 100x above its bound, and both bars must stay readable.
        ax.set_yscale("log")
        ax.set_xticks(x, panel["scenario"], rotation=20, ha="right", fontsize=8)
        # "backend: figures" on two lines, so neighbouring panels' titles do not run into each other.
        ax.set_title(titles.get(backend, backend).replace(": ", "\n", 1), fontsize=8)
        ax.set_ylabel("ms per decode step")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="lower left")  # once, low: the % labels sit on top of the bars
    fig.suptitle("Decode step: measured vs roofline (bound = max(bytes / bandwidth, FLOPs / peak))", fontsize=10)
    _save(fig, out)


def throughput(table: list[dict[str, Any]], out: Path) -> None:
    """Output tokens/s vs batch size (log2), a line per backend and prompt length; flattening = batching stops paying."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, prompt), points in tables.throughput_lines(table).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend}, prompt {prompt}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Output token throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)


def tpot_distribution(groups: dict[str, list[float]], out: Path) -> None:
    """TPOT of each measured run, a box per backend and scenario (box = middle half of runs); tall box = noisy."""
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.5))
    ax.boxplot(list(groups.values()), tick_labels=list(groups), showfliers=True)
    ax.set_ylabel("time per output token (ms)")
    ax.set_title("TPOT over measured runs")
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out)


def accuracy(rows: dict[str, dict[str, Any]], out: Path) -> None:
    """Each artifact vs HF fp32: top-1 agreement (left, 1.0 = same argmax) and perplexity change % (right, 0 = no loss)."""
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    top1 = [rows[n]["top1_agreement"] for n in names]
    axes[0].bar(names, top1, color="tab:green")
    axes[0].set_ylabel("top-1 agreement with fp32")
    # Zoom in: agreement is usually 0.98-1.0, which a 0-1 axis would flatten into identical bars.
    axes[0].set_ylim(min(0.9, min(top1) - 0.01), 1.001)
    axes[1].bar(names, [rows[n]["ppl_delta_pct"] for n in names], color="tab:orange")
    axes[1].set_ylabel("perplexity change vs fp32 (%)")
    axes[1].axhline(0, color="black", linewidth=0.8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Accuracy of each artifact against the Hugging Face fp32 reference (held-out text)")
    _save(fig, out)


def onnx_ops(ops: list[tuple[str, int, int]], ort_optimization: str | None, out: Path, top: int = 20) -> None:
    """Nodes per ONNX op type, exported vs after onnxruntime optimizations; a shorter second bar = nodes fused away."""
    ops = ops[:top]
    y = np.arange(len(ops))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ops) + 1.5))
    ax.barh(y - 0.2, [o[1] for o in ops], 0.4, label="exported")
    ax.barh(y + 0.2, [o[2] for o in ops], 0.4, label=f"after ORT ({ort_optimization})")
    ax.set_yticks(y, [o[0] for o in ops], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("nodes")
    ax.set_title("ONNX graph: node counts by op type")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, out)


def serving(rows: list[dict[str, Any]], slo: dict[str, float], out: Path) -> None:
    """Output tokens/s against TPOT p99 (left) and TTFT p99 (right), one line per backend x precision x tp/pp
    across the load points; the Pareto front (no point both faster and higher) in black, the SLO bounds dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric, name in ((axes[0], "tpot_ms_p99", "TPOT p99 (ms)"), (axes[1], "ttft_ms_p99", "TTFT p99 (ms)")):
        for config, points in pareto.series(rows).items():
            style = "s--" if config.endswith("closed loop") else "o-"
            ax.plot([r[metric] for r in points], [r["output_token_throughput"] for r in points], style, label=config)
            for r in points:
                ax.annotate(pareto.load_label(r), (r[metric], r["output_token_throughput"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        front = pareto.pareto_front(rows, metric)
        ax.step([r[metric] for r in front], [r["output_token_throughput"] for r in front], "k--", where="post",
                linewidth=1, label="Pareto front")
        ax.scatter([r[metric] for r in front], [r["output_token_throughput"] for r in front], s=120,
                   facecolors="none", edgecolors="black", zorder=3)
        bound = slo.get(metric.removesuffix("_p99"))
        if bound is not None:
            ax.axvline(bound, color="red", linestyle=":", label=f"SLO {bound:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("output tokens / s")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Serving: throughput against tail latency across the load sweep")
    _save(fig, out)

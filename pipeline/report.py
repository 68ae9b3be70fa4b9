"""Stage `report`: a markdown summary and PNG plots built from the metrics files."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
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
            ax.bar(x + i * width, p50, width, label=f"{backend} p50")
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


def _export_section(export: dict[str, Any], graph: dict[str, Any]) -> list[str]:
    lines = ["## ONNX export", "",
             f"ONNX vs torch fp32 logits: prefill max-abs-diff {export['prefill_max_abs_diff']:.3g} "
             f"(top-1 {export['prefill_top1_agreement']:.4f}), decode step with past KV "
             f"{export['decode_max_abs_diff']:.3g} (top-1 {export['decode_top1_agreement']:.4f}); "
             f"the stage (export + checks) took {_fmt(export['stage_s'])} s.", "",
             f"Graph nodes: {export['nodes_before']} exported, {export['nodes_after_ort']} after onnxruntime's "
             f"`{graph.get('ort_optimization')}` optimizations (see onnx_ops.png).", "",
             "| op type | exported | after ORT |", "|---|---|---|"]
    before, after = graph["ops_before"], graph["ops_after_ort"]
    for op in sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0))):
        lines.append(f"| {op} | {before.get(op, 0)} | {after.get(op, 0)} |")
    return lines + [""]


def _accuracy_section(evaluation: dict[str, Any], calibration: dict[str, Any] | None) -> list[str]:
    lines = ["## Accuracy against the fp32 reference", "",
             f"Held-out text, {evaluation.get('scored_positions')} scored positions; reference perplexity "
             f"{evaluation.get('reference_ppl', float('nan')):.3f}.", ""]
    if calibration:
        lines += [f"INT8: {calibration.get('quantized_activations')} activations quantized from "
                  f"{calibration.get('calibration_feeds')} calibration feeds.", ""]
    lines += ["| artifact | perplexity | ppl delta % | top-1 agreement | mean KL (nats) | gate |", "|---|---|---|---|---|---|"]
    for name, m in evaluation.items():
        if isinstance(m, dict):
            lines.append(f"| {name} | {m['ppl']:.3f} | {m['ppl_delta_pct']:+.3f} | {m['top1_agreement']:.4f} "
                         f"| {m['kl_mean']:.3g} | {'pass' if m['gate_pass'] else 'FAIL'} |")
    return lines + [""]


def _plot_ops(graph: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    before, after = graph["ops_before"], graph["ops_after_ort"]
    ops = sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0)))[:20]
    y = np.arange(len(ops))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ops) + 1.5))
    ax.barh(y - 0.2, [before.get(o, 0) for o in ops], 0.4, label="exported")
    ax.barh(y + 0.2, [after.get(o, 0) for o in ops], 0.4, label=f"after ORT ({graph.get('ort_optimization')})")
    ax.set_yticks(y, ops, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("nodes")
    ax.set_title("ONNX graph: node counts by op type")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_accuracy(evaluation: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in evaluation.items() if isinstance(m, dict)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [evaluation[n]["top1_agreement"] for n in names], color="tab:green")
    axes[0].set_ylabel("top-1 agreement with fp32")
    axes[0].set_ylim(min(0.9, min(evaluation[n]["top1_agreement"] for n in names) - 0.01), 1.001)
    axes[1].bar(names, [evaluation[n]["ppl_delta_pct"] for n in names], color="tab:orange")
    axes[1].set_ylabel("perplexity change vs fp32 (%)")
    axes[1].axhline(0, color="black", linewidth=0.8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Accuracy of each artifact against the Hugging Face fp32 reference (held-out text)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@dataclass
class ReportInputs:
    """The metrics files the report reads; optional ones add their section when given."""

    benchmark: Path
    conditions: Path
    runs: Path
    weights_metrics: Path
    weights_dir: Path
    verify: Path | None = None
    export: Path | None = None
    graph: Path | None = None
    calibrate: Path | None = None
    evaluate: Path | None = None


def _markdown(inputs: dict[str, Any], plots: list[str]) -> str:
    manifest, weights = inputs["manifest"], inputs["weights"]
    lines = ["# Llama 3 inference report", ""]
    lines += [f"- model: **{manifest.get('model')}** ({manifest.get('source')}), "
              f"{manifest.get('parameter_count', 0):,} parameters, stored as {manifest.get('dtype')}"]
    if manifest.get("source") == "hub":
        lines.append(f"- hub: `{manifest['hub_id']}` @ `{manifest.get('resolved_revision')}`")
    if manifest.get("training"):
        t = manifest["training"]
        lines.append(f"- trained {t['steps']} steps on the embedded corpus (loss {t['loss_first']} -> {t['loss_last']})")
    lines.append(f"- weights stage: {_fmt(weights.get('bytes', 0) / 2**20)} MiB written in "
                 f"{_fmt(weights.get('seconds', 0))} s")
    lines.append("")
    metrics, conditions = inputs["benchmark"], inputs["conditions"]
    for backend, scenarios in metrics.items():
        cond = conditions.get(backend, {})
        extra = f", tp={cond['tp']} pp={cond['pp']}" if "tp" in cond else ""
        graph = f", graph `{cond['onnx_graph']}`" if "onnx_graph" in cond else ""
        lines += [f"## Backend `{backend}`", "",
                  f"device `{cond.get('device')}`, precision `{cond.get('precision')}`{graph}{extra}, "
                  f"{cond.get('decoding')} decoding, {cond.get('batching')} batches, EOS ignored: "
                  f"{cond.get('ignore_eos')}, {cond.get('warmup_runs')} warm-up + {cond.get('measured_runs')} "
                  f"measured runs per scenario, percentiles: numpy `{cond.get('percentile_method')}`, memory: "
                  f"`{cond.get('memory_method')}`, load time {_fmt(scenarios.get('load_s', 0))} s.", "",
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
    for backend, cond in conditions.items():
        if "skipped" in cond:
            lines += [f"Backend `{backend}` was not run: {cond['skipped']}.", ""]
    if inputs.get("evaluate"):
        lines += _accuracy_section(inputs["evaluate"], inputs.get("calibrate"))
    if inputs.get("export") and inputs.get("graph"):
        lines += _export_section(inputs["export"], inputs["graph"])
    if inputs.get("verify"):
        lines += _verify_section(inputs["verify"])
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Definitions: TTFT = first token time - send time; TPOT = (E2E - TTFT) / (N - 1); "
              "output tok/s = tokens produced / summed end-to-end time of the measured runs.", ""]
    return "\n".join(lines)


def build(inputs: ReportInputs, out_dir: Path) -> dict[str, Any]:
    from pipeline import artifacts

    data: dict[str, Any] = {"benchmark": _read_json(inputs.benchmark), "conditions": _read_json(inputs.conditions),
                            "weights": _read_json(inputs.weights_metrics),
                            "manifest": artifacts.read_manifest(inputs.weights_dir)}
    for key in ("verify", "export", "graph", "calibrate", "evaluate"):
        path = getattr(inputs, key)
        data[key] = _read_json(path) if path is not None else None
    rows = read_runs(inputs.runs)
    if not data["benchmark"] or not rows:
        raise PipelineError(f"{inputs.benchmark}: no benchmark results to report")
    plots = ["latency.png", "throughput.png", "tpot_distribution.png"]
    if data["evaluate"]:
        plots.append("accuracy.png")
    if data["graph"]:
        plots.append("onnx_ops.png")
    with artifacts.atomic_dir(out_dir) as tmp:
        _plot_latency(data["benchmark"], tmp / "latency.png")
        _plot_throughput(data["benchmark"], tmp / "throughput.png")
        _plot_tpot_distribution(rows, tmp / "tpot_distribution.png")
        if data["evaluate"]:
            _plot_accuracy(data["evaluate"], tmp / "accuracy.png")
        if data["graph"]:
            _plot_ops(data["graph"], tmp / "onnx_ops.png")
        (tmp / "report.md").write_text(_markdown(data, plots))
    return {"files": ["report.md", *plots]}

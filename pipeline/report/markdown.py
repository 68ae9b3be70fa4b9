"""The markdown writer: reports/report.md from the parsed inputs and the computed tables."""

from __future__ import annotations

from typing import Any

from pipeline.report import pareto, tables
from pipeline.report.headline import evaluated_artifact
from pipeline.report.inputs import ReportData


def _fmt(v: float) -> str:
    return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"


def _model_section(manifest: dict[str, Any], weights: dict[str, Any]) -> list[str]:
    lines = [f"- model: **{manifest.get('model')}** ({manifest.get('source')}), "
             f"{manifest.get('parameter_count', 0):,} parameters, stored as {manifest.get('dtype')}"]
    if manifest.get("source") == "hub":
        lines.append(f"- hub: `{manifest['hub_id']}` @ `{manifest.get('resolved_revision')}`")
    if manifest.get("training"):
        t = manifest["training"]
        lines.append(f"- trained {t['steps']} steps on the embedded corpus (loss {t['loss_first']} -> {t['loss_last']})")
    lines.append(f"- weights stage: {_fmt(weights.get('bytes', 0) / 2**20)} MiB written in "
                 f"{_fmt(weights.get('seconds', 0))} s")
    return lines + [""]


def _backend_section(backend: str, rows: list[dict[str, Any]], cond: dict[str, Any], load_s: float,
                     evaluation: dict[str, Any] | None) -> list[str]:
    extra = f", tp={cond['tp']} pp={cond['pp']}" if "tp" in cond else ""
    graph = f", graph `{cond['onnx_graph']}`" if "onnx_graph" in cond else ""
    artifact = evaluated_artifact(backend, cond.get("precision"))
    scored = (evaluation or {}).get(artifact) if artifact else None
    accuracy = (f" Accuracy of the artifact it ran (`{artifact}`): perplexity {scored['ppl_delta_pct']:+.3f} % vs fp32."
                if isinstance(scored, dict) else "")
    lines = [f"## Backend `{backend}`", "",
             f"device `{cond.get('device')}`, precision `{cond.get('precision')}`{graph}{extra}, "
             f"{cond.get('decoding')} decoding, {cond.get('batching')} batches, EOS ignored: "
             f"{cond.get('ignore_eos')}, {cond.get('warmup_runs')} warm-up + {cond.get('measured_runs')} "
             f"measured runs per scenario, percentiles: numpy `{cond.get('percentile_method')}`, memory: "
             f"`{cond.get('memory_method')}`, load time {_fmt(load_s)} s.{accuracy}", "",
             f"Roofline figures: {tables.roofline_figures(cond)}. Decode bound = max(bytes / bandwidth, FLOPs / "
             "peak) per step; % of roofline = bound / TPOT p50; prefill MFU = prefill FLOPs / TTFT p50 / peak.", "",
             "| scenario | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | E2E p50 (ms) | output tok/s | peak MiB "
             "| decode bound (ms) | % of roofline | prefill MFU % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['scenario']} | {_fmt(s['ttft_ms_p50'])} / {_fmt(s['ttft_ms_p90'])} / {_fmt(s['ttft_ms_p99'])} "
                     f"| {_fmt(s['tpot_ms_p50'])} / {_fmt(s['tpot_ms_p90'])} / {_fmt(s['tpot_ms_p99'])} "
                     f"| {_fmt(s['e2el_ms_p50'])} | {_fmt(s['output_token_throughput'])} "
                     f"| {_fmt(s['peak_memory_mb'])} | {s['decode_bound_ms']:.3g} | {s['roofline_pct']:.3g} "
                     f"| {s['mfu_pct']:.3g} |")
    return lines + [""]


def _parallel_lines(parallel: dict[str, Any]) -> list[str]:
    # benchmark_conditions.json's "parallel" entry (not a backend) says whether parallel.tp x pp was measured.
    if parallel.get("not_benchmarked"):
        return [f"{parallel['not_benchmarked']}.", ""]
    if parallel.get("benchmarked_by"):
        names = ", ".join(f"`{n}`" for n in parallel["benchmarked_by"])
        return [f"parallel.tp={parallel.get('tp')} x parallel.pp={parallel.get('pp')} benchmarked by {names}.", ""]
    return []


def _accuracy_section(evaluation: dict[str, Any], calibration: dict[str, Any] | None) -> list[str]:
    lines = ["## Accuracy against the fp32 reference", "",
             f"Held-out text, {evaluation.get('scored_positions')} scored positions; reference perplexity "
             f"{evaluation.get('reference_ppl', float('nan')):.3f}.", ""]
    if calibration:
        lines += [f"INT8: {calibration.get('quantized_activations')} activations quantized from "
                  f"{calibration.get('calibration_feeds')} calibration feeds.", ""]
    lines += ["| artifact | perplexity | ppl delta % | top-1 agreement | mean KL (nats) | gate |",
              "|---|---|---|---|---|---|"]
    for name, m in tables.accuracy_rows(evaluation).items():
        lines.append(f"| {name} | {m['ppl']:.3f} | {m['ppl_delta_pct']:+.3f} | {m['top1_agreement']:.4f} "
                     f"| {m['kl_mean']:.3g} | {'pass' if m['gate_pass'] else 'FAIL'} |")
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
    lines += [f"| {op} | {before} | {after} |" for op, before, after in tables.op_counts(graph)]
    return lines + [""]


def _verify_section(verify: dict[str, Any]) -> list[str]:
    layout = verify.get("layout", {})
    lines = [f"## Tensor/pipeline-parallel checkpoints (tp={layout.get('tp')}, pp={layout.get('pp')})", "",
             "Each converted checkpoint re-run by the project's TP x PP torch runner (torchrun) against Hugging "
             "Face fp32 on the same prompts.", "",
             "| format | logits max-abs-diff | top-1 agreement | greedy tokens identical | gate |",
             "|---|---|---|---|---|"]
    for fmt, m in verify.items():
        if fmt == "layout":
            continue
        lines.append(f"| {fmt} | {m['logits_max_abs_diff']:.3g} | {m['top1_agreement']:.4f} "
                     f"| {'yes' if m['generation_token_exact'] else 'no'} | {'pass' if m['gate_pass'] else 'FAIL'} |")
    return lines + [""]


def _serving_section(serving: dict[str, Any], price_per_hour: float | None = None) -> list[str]:
    rows, settings = serving["points"], serving["settings"]
    slo = settings.get("slo", {})
    lines = ["## Serving", ""]
    for name, why in serving.get("failed", {}).items():  # its worker crashed or timed out
        lines += [f"**Backend `{name}` FAILED**: {why}.", ""]
    lines += [
             f"{settings.get('num_requests')} requests per load point ({settings.get('dataset')}: input "
             f"{settings.get('input_len')}, output {settings.get('output_len')} tokens, range ratio "
             f"{settings.get('range_ratio')}), {settings.get('max_num_seqs')} sequences at most in flight. Goodput: "
             f"requests meeting {', '.join(f'{k} <= {v:g}' for k, v in slo.items())} per second. Bound: output tok/s "
             "of full waves at the roofline (prefill at peak FLOP/s, decode at the memory roofline).", "",
             "| backend | precision | load | output tok/s | % of bound | req/s | goodput req/s (%) | TTFT p50 / p99 ms "
             "| TPOT p50 / p99 ms | ITL p99 ms | E2EL p99 ms | mean concurrency | KV-slot use |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['precision']} | {pareto.load_label(r)} | {r['output_token_throughput']:.1f} "
            f"| {_fmt(r.get('throughput_roofline_pct', float('nan')))} | {r['request_throughput']:.2f} "
            f"| {r['goodput']:.2f} ({100 * r.get('goodput_fraction', 0):.0f} %) "
            f"| {r.get('ttft_ms_p50', float('nan')):.1f} / {r['ttft_ms_p99']:.1f} "
            f"| {r.get('tpot_ms_p50', float('nan')):.2f} / {r['tpot_ms_p99']:.2f} | {r.get('itl_ms_p99', float('nan')):.2f} "
            f"| {r['e2el_ms_p99']:.1f} | {r.get('mean_concurrency', float('nan')):.1f} "
            f"| {_fmt(100 * r['kv_slot_utilization']) + ' %' if 'kv_slot_utilization' in r else '-'} |")
    lines += ["", "Best configuration per SLO (highest goodput among points meeting it at p99):", "",
              "| SLO | configuration | load | goodput req/s | output tok/s | TTFT p99 ms | TPOT p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for bounds in (slo, {}):
        b = pareto.best(rows, bounds, "goodput" if bounds else "output_token_throughput")
        if b is None:
            lines.append(f"| {pareto.slo_text(bounds)} | no measured point meets it | | | | | |")
        else:
            lines.append(f"| {pareto.slo_text(bounds)} | {pareto.label(b)} | {pareto.load_label(b)} | {b['goodput']:.2f} "
                         f"| {b['output_token_throughput']:.1f} | {b['ttft_ms_p99']:.1f} | {b['tpot_ms_p99']:.2f} |")
    return lines + ["", "Any metric can be recomputed from `metrics/serving_requests.jsonl` (every token's time); "
                    "`python -m pipeline advise --ttft-p99-ms ... --tpot-p99-ms ...` ranks every measured run.", ""]


def render(data: ReportData, table: list[dict[str, Any]], plots: list[str]) -> str:
    """report.md: model, one section per benchmarked backend, skipped backends, accuracy, export, TP/PP, plots."""
    lines = ["# Llama 3 inference report", ""] + _model_section(data.manifest, data.weights)
    for backend in tables.backends(table):
        rows = [row for row in table if row["backend"] == backend]
        lines += _backend_section(backend, rows, data.conditions.get(backend, {}),
                                  data.benchmark[backend].get("load_s", 0), data.evaluate)
    for backend, cond in data.conditions.items():
        if "skipped" in cond:
            lines += [f"Backend `{backend}` was not run: {cond['skipped']}.", ""]
        if "failed" in cond:
            lines += [f"**Backend `{backend}` FAILED**: {cond['failed']}.", ""]
    if isinstance(data.conditions.get("parallel"), dict):
        lines += _parallel_lines(data.conditions["parallel"])
    if data.evaluate:
        lines += _accuracy_section(data.evaluate, data.calibrate)
    if data.export and data.graph:
        lines += _export_section(data.export, data.graph)
    if data.verify:
        lines += _verify_section(data.verify)
    if data.serving and data.serving["points"]:
        lines += _serving_section(data.serving)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Definitions: TTFT = first token time - send time; TPOT = (E2E - TTFT) / (N - 1); "
              "output tok/s = tokens produced / summed end-to-end time of the measured runs.", ""]
    return "\n".join(lines)

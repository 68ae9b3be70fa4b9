"""Accuracy of inference artifacts against the Hugging Face fp32 torch reference, on held-out text.

Every artifact is run on the same token sequences from pipeline/data/heldout.txt (never the
calibration corpus), in one full-sequence forward (prefill with an empty KV cache), and reduced
to next-token logits [sequences, positions, vocab]. The torch artifacts are Hugging Face's
LlamaForCausalLM at fp32/fp16/bf16 and, for the weight-quantized precisions (int8-wo, fp8-wo, fp8),
the project's own Llama (pipeline/model/llama.py) loaded with the same weights, its linears quantized
by pipeline/model/quant.py from the fp32 weights and the rest run in the precision's compute dtype, on
CPU. One scorer then compares them with the fp32 reference:

    ppl             exp(mean next-token negative log-likelihood) of the artifact on the held-out tokens
    ppl_delta_pct   100 * (ppl - ppl_ref) / ppl_ref   (signed: a gain in ppl never fails the gate)
    top1_agreement  fraction of positions where argmax(artifact) == argmax(reference)
    kl_mean         mean over positions of KL(p_ref || p_artifact), nats

All three are computed in float64 from float32 logits with log-softmax, over the positions that
predict a held-out token (the last position of each sequence has no target and is left out).

A model directory without a tokenizer (a random preset of a real shape) is scored on seeded random
ids instead: ppl against random targets means nothing there, but top-1 agreement and KL still measure
how far an artifact is from the reference, which is what the gate is for. The result says so in "text"."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError, read_text
from pipeline.model.tokenizer import HELDOUT
from pipeline.precision import WEIGHT_QUANT_PRECISIONS

GATE_MODES = ("off", "warn", "fail")
RANDOM_SEQUENCES = 8  # sequences scored without a tokenizer when evaluate.max_sequences is not set
RANDOM_TEXT = "random-ids (no tokenizer; ppl is not meaningful, top-1 and KL still compare against the reference)"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Gate:
    """An artifact passes when ppl_delta_pct <= max_ppl_delta_pct and top1_agreement >= min_top1."""
    max_ppl_delta_pct: float = 3.0
    min_top1: float = 0.95
    mode: str = "warn"

    def validate(self) -> None:
        if self.mode not in GATE_MODES:
            raise PipelineError(f"evaluate.gate.mode must be one of {', '.join(GATE_MODES)}; got {self.mode!r}")
        if not self.max_ppl_delta_pct >= 0:
            raise PipelineError(f"evaluate.gate.max_ppl_delta_pct must be >= 0, got {self.max_ppl_delta_pct}")
        if not 0 <= self.min_top1 <= 1:
            raise PipelineError(f"evaluate.gate.min_top1 must be in [0, 1], got {self.min_top1}")


def heldout_sequences(model_dir: Path, *, seq_len: int = 64, max_sequences: int | None = None,
                      text_path: Path = HELDOUT, seed: int = 0) -> np.ndarray:
    """Non-overlapping windows of seq_len tokens of the tokenized held-out text -> int64 [N, seq_len].
    Without model_dir/tokenizer.json: max_sequences (default RANDOM_SEQUENCES) seeded random id
    sequences in [0, vocab_size) instead."""
    from pipeline.model.hf import has_tokenizer, load_tokenizer, random_token_ids

    text_path = Path(text_path)
    if seq_len < 2:
        raise PipelineError(f"evaluate.seq_len must be >= 2 (one token predicts the next), got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise PipelineError(f"evaluate.max_sequences must be >= 1 or null, got {max_sequences}")
    if not has_tokenizer(model_dir):
        if not (Path(model_dir) / "config.json").is_file():
            raise PipelineError(f"{model_dir}/config.json: not found; run the weights stage first (dvc repro weights)")
        return random_token_ids(model_dir, (max_sequences or RANDOM_SEQUENCES, seq_len), seed)
    if not text_path.is_file():
        raise PipelineError(f"{text_path}: held-out text not found")
    text = read_text(text_path, "save the held-out text as UTF-8")
    ids = np.asarray(load_tokenizer(model_dir)(text).input_ids, dtype=np.int64)
    n = len(ids) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n < 1:
        raise PipelineError(f"{text_path}: {len(ids)} tokens, fewer than one evaluate.seq_len={seq_len} window; "
                            f"lower evaluate.seq_len")
    return ids[: n * seq_len].reshape(n, seq_len)


def quantized_model(model_dir: Path, precision: str):
    """The project's Llama with the model directory's weights, every linear quantized to `precision` (one of
    WEIGHT_QUANT_PRECISIONS) from the fp32 weights, the rest cast to its compute dtype; CPU, eval mode."""
    from pipeline.model.args import LlamaArgs
    from pipeline.model.hf import CONFIG_FILE, load_hf_model, read_config
    from pipeline.model.llama import Llama, hf_layout_state_dict
    from pipeline.model.quant import check_supported, quantize_
    from pipeline.precision import torch_dtype

    check_supported(precision, torch.device("cpu"))
    args = LlamaArgs.from_hf_config(read_config(model_dir), str(Path(model_dir) / CONFIG_FILE))
    # Hugging Face reads the directory (single file or sharded index, any storage dtype) and its names are the
    # project model's names; assign=True takes its fp32 tensors without a copy.
    state = hf_layout_state_dict(load_hf_model(model_dir, torch.float32).state_dict(), args)
    with torch.device("meta"):
        model = Llama(args)
    model.load_state_dict(state, strict=True, assign=True)
    return quantize_(model, precision).to(torch_dtype(precision)).eval()


@torch.inference_mode()
def torch_logits(model_dir: Path, sequences: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """Logits of the Hugging Face model run in fp32, fp16 or bf16, or of the project's Llama with weight-quantized
    linears (int8-wo, fp8-wo, fp8) on CPU (returned as float32)."""
    from pipeline.model.hf import load_hf_model

    if precision in WEIGHT_QUANT_PRECISIONS:
        model = quantized_model(model_dir, precision)
        model.setup_cache(1, sequences.shape[1])  # every window has the same length; each forward rewrites it
        positions = torch.arange(sequences.shape[1])
        return np.stack([model(torch.from_numpy(seq[None]), positions)[0].float().numpy() for seq in sequences])
    if precision not in TORCH_DTYPES:
        raise PipelineError(f"evaluate: torch precision must be one of "
                            f"{', '.join((*TORCH_DTYPES, *WEIGHT_QUANT_PRECISIONS))}; got {precision!r}")
    model = load_hf_model(model_dir, TORCH_DTYPES[precision])
    out = [model(input_ids=torch.from_numpy(seq[None]), use_cache=False).logits[0].float().numpy()
           for seq in sequences]
    return np.stack(out)


def onnx_logits(onnx_path: Path, sequences: np.ndarray, num_threads: int = 0) -> np.ndarray:
    """Logits of an exported decoder (fp32, fp16, bf16 or INT8 QDQ) through onnxruntime, empty past."""
    from pipeline.onnx_io import empty_past_feeds, ort_session

    import tempfile

    import onnx

    from pipeline.export import widen_bf16

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise PipelineError(f"{onnx_path}: not found; run the stage that makes it (export or calibrate)")
    with tempfile.TemporaryDirectory(prefix="eval-onnx-") as scratch:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        if any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in graph.input):
            # onnxruntime's CPU provider has no bf16 kernels: score the bf16 weights widened to fp32 (exact).
            model = onnx.load(str(onnx_path))
            widen_bf16(model)
            onnx_path = Path(scratch) / onnx_path.name
            onnx.save_model(model, str(onnx_path), save_as_external_data=model.ByteSize() > 1 << 30)
        session = ort_session(onnx_path, num_threads=num_threads)
        past = empty_past_feeds(session, 1)
        out = []
        for seq in sequences:
            t = len(seq)
            feeds = {"input_ids": seq[None], "attention_mask": np.ones((1, t), np.int64),
                     "position_ids": np.arange(t, dtype=np.int64)[None], **past}
            out.append(session.run(["logits"], feeds)[0][0].astype(np.float32))
        return np.stack(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(logits: np.ndarray, reference: np.ndarray, sequences: np.ndarray) -> dict[str, float]:
    """ppl, ppl_delta_pct, top1_agreement and kl_mean of logits vs the reference logits (see module doc)."""
    if logits.shape != reference.shape or logits.shape[:2] != sequences.shape:
        raise PipelineError(f"evaluate: logits {logits.shape}, reference {reference.shape} and sequences "
                            f"{sequences.shape} do not line up")
    if not np.isfinite(logits).all():
        raise PipelineError("evaluate: the artifact produced non-finite logits")
    lp, lq = _log_softmax(logits[:, :-1]), _log_softmax(reference[:, :-1])
    targets = sequences[:, 1:, None]
    ppl = float(np.exp(-np.take_along_axis(lp, targets, axis=-1).mean()))
    ppl_ref = float(np.exp(-np.take_along_axis(lq, targets, axis=-1).mean()))
    kl = (np.exp(lq) * (lq - lp)).sum(axis=-1)
    top1 = (logits[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1)).mean()
    return {"ppl": ppl, "ppl_ref": ppl_ref, "ppl_delta_pct": 100.0 * (ppl - ppl_ref) / ppl_ref,
            "top1_agreement": float(top1), "kl_mean": float(kl.mean())}


def apply_gate(metrics: dict[str, float], gate: Gate) -> dict[str, float]:
    """metrics plus gate_pass (1/0); mode 'off' still records whether the thresholds were met."""
    ok = metrics["ppl_delta_pct"] <= gate.max_ppl_delta_pct and metrics["top1_agreement"] >= gate.min_top1
    return {**metrics, "gate_pass": int(ok)}


def enforce_gate(results: dict[str, dict[str, float]], gate: Gate) -> list[str]:
    """Names of artifacts that failed; with mode 'fail', raise naming the first (and how many)."""
    failed = [name for name, m in results.items() if not m["gate_pass"]]
    if failed and gate.mode == "fail":
        m = results[failed[0]]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise PipelineError(
            f"accuracy gate failed for artifact '{failed[0]}'{more}: "
            f"ppl_delta_pct={m['ppl_delta_pct']:.2f} (max evaluate.gate.max_ppl_delta_pct={gate.max_ppl_delta_pct}), "
            f"top1_agreement={m['top1_agreement']:.4f} (min evaluate.gate.min_top1={gate.min_top1})")
    return failed


def evaluate(model_dir: Path, *, onnx_models: dict[str, Path] | None = None,
             torch_precisions: tuple[str, ...] = ("fp32", "fp16", "bf16"), gate: Gate = Gate(),
             seq_len: int = 64, max_sequences: int | None = None, text_path: Path = HELDOUT) -> dict[str, Any]:
    """Score each artifact against the fp32 reference -> {artifact: metrics}. Artifacts are named
    'torch_<precision>' (e.g. 'torch_bf16', 'torch_int8-wo') and the keys of onnx_models (e.g. {'onnx_fp32': ..., 'onnx_int8': ...}).
    The reference itself ('torch_fp32') scores exactly ppl_delta 0, top-1 1, KL 0."""
    gate.validate()
    from pipeline.model.hf import has_tokenizer

    sequences = heldout_sequences(model_dir, seq_len=seq_len, max_sequences=max_sequences, text_path=text_path)
    reference = torch_logits(model_dir, sequences, "fp32")
    results: dict[str, dict[str, float]] = {}
    for precision in torch_precisions:
        logits = reference if precision == "fp32" else torch_logits(model_dir, sequences, precision)
        results[f"torch_{precision}"] = score(logits, reference, sequences)
    for name, path in (onnx_models or {}).items():
        results[name] = score(onnx_logits(path, sequences), reference, sequences)
    reference_ppl = score(reference, reference, sequences)["ppl"]
    # ppl_ref is the same for every artifact: reported once, as reference_ppl
    results = {name: apply_gate({k: v for k, v in m.items() if k != "ppl_ref"}, gate)
               for name, m in results.items()}
    enforce_gate(results, gate)
    return {"metrics": results, "reference_ppl": reference_ppl, "sequences": int(sequences.shape[0]),
            "seq_len": int(sequences.shape[1]),
            "scored_positions": int(sequences.shape[0] * (sequences.shape[1] - 1)),
            # the file's name, not its path: the result (an MLflow tag) is then the same in every checkout
            "text": Path(text_path).name if has_tokenizer(model_dir) else RANDOM_TEXT,
            "gate": {"max_ppl_delta_pct": gate.max_ppl_delta_pct, "min_top1": gate.min_top1, "mode": gate.mode}}

"""pipeline/evaluate.py: the scorer's arithmetic, the gate, and the artifacts against the fp32 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluate import Gate, apply_gate, enforce_gate, score

pytest_plugins = ["tests.fixtures_onnx"]


def test_score_by_hand():
    # one sequence [0, 1]: position 0 predicts token 1; the last position has no target and is ignored
    seq = np.array([[0, 1]])
    ref = np.array([[[0.0, math.log(3.0)], [5.0, -5.0]]])    # p_ref = (1/4, 3/4), argmax 1
    art = np.array([[[math.log(3.0), 0.0], [-9.0, 9.0]]])    # p_art = (3/4, 1/4), argmax 0
    m = score(art, ref, seq)
    assert m["ppl_ref"] == pytest.approx(4 / 3)              # 1 / p_ref(token 1)
    assert m["ppl"] == pytest.approx(4.0)
    assert m["ppl_delta_pct"] == pytest.approx(200.0)
    assert m["top1_agreement"] == 0.0
    assert m["kl_mean"] == pytest.approx(0.25 * math.log(1 / 3) + 0.75 * math.log(3))


def test_score_identity_and_uniform():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 16, (3, 9))
    logits = rng.normal(size=(3, 9, 16)).astype(np.float32)
    m = score(logits, logits, seq)
    assert m["ppl_delta_pct"] == 0 and m["top1_agreement"] == 1 and m["kl_mean"] == 0
    flat = np.zeros_like(logits)
    assert score(flat, flat, seq)["ppl"] == pytest.approx(16.0)  # uniform over the vocab
    with pytest.raises(PipelineError, match="non-finite"):
        score(np.full_like(logits, np.nan), logits, seq)
    with pytest.raises(PipelineError, match="do not line up"):
        score(logits[:, :-1], logits, seq)


def test_gate_pass_and_fail_modes():
    good = {"ppl_delta_pct": 3.0, "top1_agreement": 0.95}
    bad = {"ppl_delta_pct": 3.01, "top1_agreement": 0.99}
    gate = Gate(max_ppl_delta_pct=3.0, min_top1=0.95, mode="fail")
    results = {"onnx_fp32": apply_gate(good, gate), "onnx_int8": apply_gate(bad, gate)}
    assert results["onnx_fp32"]["gate_pass"] == 1 and results["onnx_int8"]["gate_pass"] == 0
    assert apply_gate({"ppl_delta_pct": -50.0, "top1_agreement": 0.949}, gate)["gate_pass"] == 0
    with pytest.raises(PipelineError, match="accuracy gate failed for artifact 'onnx_int8': ppl_delta_pct=3.01") as e:
        enforce_gate(results, gate)
    assert "\n" not in str(e.value)
    assert enforce_gate(results, Gate(mode="warn")) == ["onnx_int8"]
    for bad_gate, key in ((Gate(mode="strict"), "mode"), (Gate(min_top1=1.5), "min_top1"),
                          (Gate(max_ppl_delta_pct=-1), "max_ppl_delta_pct")):
        with pytest.raises(PipelineError, match=f"evaluate.gate.{key}"):
            bad_gate.validate()


def test_heldout_is_not_calibration_text(onnx_tiny_dir):
    from pipeline.calibrate import load_calibration_text
    from pipeline.evaluate import heldout_sequences
    from pipeline.model.hf import load_tokenizer

    seqs = heldout_sequences(onnx_tiny_dir, seq_len=64)
    assert seqs.shape == (7, 64)
    corpus = load_tokenizer(onnx_tiny_dir)(load_calibration_text()).input_ids
    corpus_grams = {tuple(corpus[i:i + 8]) for i in range(len(corpus) - 8)}
    grams = [tuple(s[i:i + 8]) for s in seqs.tolist() for i in range(0, 57, 8)]
    assert sum(g in corpus_grams for g in grams) / len(grams) < 0.1


def test_no_tokenizer_scores_seeded_random_ids(onnx_notok_dir):
    from pipeline.evaluate import RANDOM_SEQUENCES, heldout_sequences

    seqs = heldout_sequences(onnx_notok_dir, seq_len=16)
    assert seqs.shape == (RANDOM_SEQUENCES, 16) == (8, 16) and seqs.dtype == np.int64
    assert seqs.min() >= 0 and seqs.max() < 512 and len(np.unique(seqs)) > 64
    assert (seqs == heldout_sequences(onnx_notok_dir, seq_len=16)).all()
    assert not (seqs == heldout_sequences(onnx_notok_dir, seq_len=16, seed=1)).all()
    assert heldout_sequences(onnx_notok_dir, seq_len=16, max_sequences=3).shape == (3, 16)
    with pytest.raises(PipelineError, match="evaluate.max_sequences must be >= 1"):
        heldout_sequences(onnx_notok_dir, seq_len=16, max_sequences=0)


def test_evaluate_without_tokenizer_is_labelled(onnx_notok_dir, onnx_export, onnx_int8):
    """The accuracy stage still runs for a random preset: top-1 and KL against the reference stay
    meaningful (fp32 graph agrees exactly, INT8 does not), and the result says ppl is not."""
    from pipeline.evaluate import RANDOM_TEXT, evaluate

    result = evaluate(onnx_notok_dir, onnx_models={"onnx_fp32": onnx_export[0] / "model.onnx",
                                                   "onnx_int8": onnx_int8["minmax"][0] / "model.onnx"},
                      torch_precisions=("fp32",), seq_len=16, max_sequences=2)
    assert result["text"] == RANDOM_TEXT and RANDOM_TEXT.startswith("random-ids (no tokenizer; ppl is not meaningful")
    assert result["sequences"] == 2 and result["scored_positions"] == 2 * 15
    fp32, int8 = result["metrics"]["onnx_fp32"], result["metrics"]["onnx_int8"]
    assert fp32["top1_agreement"] == 1 and fp32["kl_mean"] < 1e-9
    assert int8["kl_mean"] > 100 * fp32["kl_mean"] and int8["kl_mean"] > 0


def test_reference_and_fp32_artifacts(onnx_accuracy):
    metrics = onnx_accuracy["metrics"]
    ref = metrics["torch_fp32"]
    assert ref["ppl_delta_pct"] == 0 and ref["top1_agreement"] == 1 and ref["kl_mean"] == 0 and ref["gate_pass"] == 1
    # trained for 150 steps: far below a uniform guess over the 512-token vocab
    assert ref["ppl"] == onnx_accuracy["reference_ppl"] < 150
    onnx = metrics["onnx_fp32"]
    assert onnx["top1_agreement"] == 1 and abs(onnx["ppl_delta_pct"]) < 1e-3 and onnx["kl_mean"] < 1e-9
    assert onnx_accuracy["scored_positions"] == 7 * 63
    assert onnx_accuracy["text"] == "heldout.txt"  # real text (named, not located), not the random-ids label


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_torch(onnx_accuracy, precision):
    m = onnx_accuracy["metrics"][f"torch_{precision}"]
    assert 0 < m["kl_mean"] < 1e-3 and abs(m["ppl_delta_pct"]) < 1.0 and m["top1_agreement"] >= 0.97
    assert m["gate_pass"] == 1


def test_evaluate_fail_mode_names_the_artifact(onnx_tiny_dir, onnx_int8):
    from pipeline.evaluate import evaluate

    strict = Gate(max_ppl_delta_pct=3.0, min_top1=1.0, mode="fail")  # INT8 cannot agree on every position
    with pytest.raises(PipelineError, match="accuracy gate failed for artifact 'int8'"):
        evaluate(onnx_tiny_dir, onnx_models={"int8": onnx_int8["minmax"][0] / "model.onnx"},
                 torch_precisions=("fp32",), gate=strict, max_sequences=2)


def test_missing_artifact(onnx_tiny_dir, tmp_path):
    from pipeline.evaluate import onnx_logits

    with pytest.raises(PipelineError, match="model.onnx: not found"):
        onnx_logits(tmp_path / "model.onnx", np.zeros((1, 4), np.int64))


def test_training_makes_the_tiny_model_peaked(random_tiny_dir, onnx_tiny_dir, onnx_accuracy):
    """Why the accuracy tests use the trained tiny model: the random one is ~uniform on held-out text."""
    from pipeline import artifacts
    from pipeline.evaluate import heldout_sequences, torch_logits

    assert artifacts.read_manifest(random_tiny_dir)["training"] is None
    stats = artifacts.read_manifest(onnx_tiny_dir)["training"]
    assert stats["loss_last"] < stats["loss_first"] - 2.0
    seqs = heldout_sequences(random_tiny_dir)
    random_logits = torch_logits(random_tiny_dir, seqs)
    assert score(random_logits, random_logits, seqs)["ppl"] > 400  # vocab 512: close to a uniform guess
    assert onnx_accuracy["reference_ppl"] < 150


def test_train_tiny_rejects_bad_settings(tmp_path):
    from pipeline.model.train_tiny import train_tiny

    with pytest.raises(PipelineError, match="steps=0"):
        train_tiny(tmp_path, tmp_path / "c.txt", steps=0)
    with pytest.raises(PipelineError, match="model.safetensors: not found"):
        train_tiny(tmp_path, tmp_path / "c.txt")


# ---- the weight-quantized precisions: the project's Llama with pipeline/model/quant.py linears, on CPU ----

# Measured on the trained tiny model, 7 x 63 held-out positions, torch 2.13 CPU, bf16 compute
# (ppl_delta_pct / top1 / kl_mean): int8-wo -0.03 / 0.989 / 3e-5, fp8-wo -0.00 / 0.973 / 2.2e-4,
# fp8 +0.06 / 0.966 / 4.2e-4. Floors a little below, all above the default gate (0.95).
QUANT_TOP1_FLOOR = {"int8-wo": 0.98, "fp8-wo": 0.965, "fp8": 0.96}


@pytest.fixture(scope="module")
def quantized_accuracy(onnx_tiny_dir) -> dict:
    from pipeline.evaluate import evaluate
    from pipeline.precision import WEIGHT_QUANT_PRECISIONS

    return evaluate(onnx_tiny_dir, torch_precisions=("fp32", *WEIGHT_QUANT_PRECISIONS))


def test_weight_quantized_precisions_pass_the_gate(quantized_accuracy):
    metrics = quantized_accuracy["metrics"]
    assert set(metrics) == {"torch_fp32", "torch_int8-wo", "torch_fp8-wo", "torch_fp8"}
    for precision, floor in QUANT_TOP1_FLOOR.items():
        m = metrics[f"torch_{precision}"]
        assert m["gate_pass"] == 1 and floor <= m["top1_agreement"] < 1
        assert abs(m["ppl_delta_pct"]) < 0.5 and 0 < m["kl_mean"] < 1e-3
    # coarser numbers move the distribution further: int8 steps < e4m3 weights < e4m3 weights and activations
    kl = [metrics[f"torch_{p}"]["kl_mean"] for p in ("int8-wo", "fp8-wo", "fp8")]
    assert kl == sorted(kl) and kl[0] * 3 < kl[2]


def test_quantized_model_is_the_project_llama(onnx_tiny_dir):
    import torch

    from pipeline.evaluate import quantized_model
    from pipeline.model.llama import Llama
    from pipeline.model.quant import Int8WeightOnlyLinear

    model = quantized_model(onnx_tiny_dir, "int8-wo")
    assert isinstance(model, Llama) and not model.training and isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.int8
    assert model.lm_head.scale.dtype == torch.float32


def test_torch_precisions_accepted(onnx_tiny_dir):
    from pipeline import config
    from pipeline.errors import ConfigError
    from pipeline.evaluate import torch_logits

    config.EvaluateConfig(torch_precisions=["fp32", "bf16", "int8-wo", "fp8-wo", "fp8"]).validate()
    with pytest.raises(ConfigError, match=r"^evaluate.torch_precisions\[1\] must be one of fp32, fp16, bf16, "
                                          r"int8-wo, fp8-wo, fp8; got 'int8'$"):
        config.EvaluateConfig(torch_precisions=["fp32", "int8"]).validate()  # int8 is the ONNX QDQ graph
    with pytest.raises(PipelineError, match="torch precision must be one of fp32, fp16, bf16, int8-wo, fp8-wo, fp8"):
        torch_logits(onnx_tiny_dir, np.zeros((1, 4), np.int64), "int4")

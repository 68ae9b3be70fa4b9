"""pipeline/calibrate.py: ORT static INT8 QDQ, calibration table, and clean failures."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from pipeline import artifacts
from pipeline.errors import PipelineError
from tests.fixtures_onnx import METHODS

pytest_plugins = ["tests.fixtures_onnx"]


def _activation_quantizers(model_path):
    import onnx

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    return model, inits, [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


@pytest.mark.parametrize("method", METHODS)
def test_accuracy_gate_met_per_method(onnx_accuracy, method):
    """Default gate (ppl delta <= 3 %, top-1 >= 0.95) on held-out text vs the fp32 torch reference."""
    m = onnx_accuracy["metrics"][f"onnx_int8_{method}"]
    assert m["top1_agreement"] >= 0.95, m
    assert m["ppl_delta_pct"] <= 3.0, m
    assert m["gate_pass"] == 1
    assert 0 < m["kl_mean"] < 0.01  # quantization changed something, but little


@pytest.mark.parametrize("method", METHODS)
def test_qdq_model_is_symmetric_int8_per_channel(onnx_int8, method):
    from onnx import TensorProto, numpy_helper

    out_dir, manifest = onnx_int8[method]
    artifacts.verify_manifest(out_dir)
    model, inits, act_q = _activation_quantizers(out_dir / "model.onnx")
    assert manifest["metrics"]["quantized_activations"] == len(act_q) > 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.domain in ("", "ai.onnx")  # standard Q/DQ, no com.microsoft contrib ops
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.INT8
            assert not numpy_helper.to_array(zp).any()  # zero point 0 everywhere (TensorRT needs it)
    # weights: per-channel DequantizeLinear on int8 initializers, one scale per output column
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(numpy_helper.to_array(inits[n.input[1]]).ndim == 1 for n in weight_dq)
    # only MatMul inputs were quantized
    consumers = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_out <= consumers


@pytest.mark.parametrize("method", METHODS)
def test_calibration_table_complete_and_round_trips(onnx_int8, method, tmp_path):
    from onnx import numpy_helper

    from pipeline.calibrate import load_calibration_table, write_calibration_table

    out_dir, _ = onnx_int8[method]
    table = load_calibration_table(out_dir / "calibration.json")
    _, inits, act_q = _activation_quantizers(out_dir / "model.onnx")
    assert set(table) == {n.input[0] for n in act_q}  # every quantized activation, nothing else
    for node in act_q:
        entry = table[node.input[0]]
        assert math.isfinite(entry["scale"]) and entry["scale"] > 0
        assert entry["scale"] == pytest.approx(float(numpy_helper.to_array(inits[node.input[1]])))
        assert entry["zero_point"] == 0
        assert entry["min"] <= entry["max"] and entry["amax"] == max(abs(entry["min"]), abs(entry["max"]))
        if method == "minmax":  # symmetric int8: scale = amax / 127 exactly for the raw min/max ranges
            assert entry["scale"] == pytest.approx(entry["amax"] / 127, rel=1e-6)
    write_calibration_table(tmp_path / "t.json", table, method=method)
    assert load_calibration_table(tmp_path / "t.json") == table
    assert json.loads((tmp_path / "t.json").read_text())["method"] == method


def test_calibration_table_loader_rejects_bad_scales(tmp_path):
    from pipeline.calibrate import load_calibration_table, write_calibration_table

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        write_calibration_table(tmp_path / "t.json", {"x": {"min": -1, "max": 1, "scale": bad, "zero_point": 0}})
        with pytest.raises(PipelineError, match="'x' has scale"):
            load_calibration_table(tmp_path / "t.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not a calibration table"):
        load_calibration_table(tmp_path / "t.json")


def test_feeds_hold_prefill_and_decode_samples(onnx_tiny_dir, onnx_export, onnx_int8):
    from pipeline.calibrate import build_feeds, calibration_windows, load_calibration_text
    from pipeline.onnx_io import ort_session

    windows = calibration_windows(onnx_tiny_dir, load_calibration_text(), num_samples=3, seq_len=10, seed=0)
    assert windows.shape == (3, 11)
    again = calibration_windows(onnx_tiny_dir, load_calibration_text(), num_samples=3, seq_len=10, seed=0)
    other = calibration_windows(onnx_tiny_dir, load_calibration_text(), num_samples=3, seq_len=10, seed=1)
    assert (windows == again).all() and not (windows == other).all()
    feeds = build_feeds(ort_session(onnx_export[0] / "model.onnx"), windows, batch_size=2)
    assert [f["past_key_values.0.key"].shape[2] for f in feeds] == [0, 10, 0, 10]  # prefill, decode, ...
    assert [f["input_ids"].shape for f in feeds] == [(2, 10), (2, 1), (1, 10), (1, 1)]
    assert (feeds[1]["position_ids"] == 10).all() and feeds[1]["attention_mask"].shape == (2, 11)
    assert onnx_int8["minmax"][1]["metrics"]["calibration_feeds"] == 2 * 16


def test_calibration_source_recorded_with_tokenizer(onnx_int8):
    import hashlib

    from pipeline.model.tokenizer import CORPUS

    settings = onnx_int8["minmax"][1]["settings"]
    # named and pinned by content, not by the checkout's absolute path
    assert settings["dataset"] == CORPUS.name == "corpus.txt"
    assert settings["text_sha256"] == hashlib.sha256(CORPUS.read_text(encoding="utf-8").encode()).hexdigest()


def test_no_tokenizer_calibrates_on_seeded_random_ids(onnx_notok_dir, onnx_export, tmp_path):
    """A model dir without tokenizer.json (random preset) is calibrated on random ids: the text is never
    read (a missing corpus does not matter), the windows follow the seed, and the manifest says so."""
    from pipeline.calibrate import RANDOM_IDS, quantize, random_windows

    windows = random_windows(onnx_notok_dir, num_samples=4, seq_len=8, seed=3)
    assert windows.shape == (4, 9) and windows.dtype == np.int64
    assert windows.min() >= 0 and windows.max() < 512 and len(np.unique(windows)) > 18
    assert (windows == random_windows(onnx_notok_dir, num_samples=4, seq_len=8, seed=3)).all()
    assert not (windows == random_windows(onnx_notok_dir, num_samples=4, seq_len=8, seed=4)).all()

    manifest = quantize(onnx_export[0] / "model.onnx", onnx_notok_dir, tmp_path / "q", num_samples=2, seq_len=8,
                        seed=3, corpus_path=tmp_path / "no-such-corpus.txt")
    assert manifest["settings"]["dataset"] == RANDOM_IDS == "random-ids (no tokenizer)"
    assert manifest["settings"]["text_sha256"] is None
    assert manifest["settings"]["seed"] == 3 and manifest["metrics"]["calibration_feeds"] == 2 * 2
    assert manifest["metrics"]["quantize_linear_nodes"] > 0
    artifacts.verify_manifest(tmp_path / "q")


def test_no_tokenizer_rejects_a_dataset(onnx_notok_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_notok_dir, tmp_path / "q", "calibration.dataset='wikitext' needs a "
         "tokenizer, but .*tokenizer.json does not exist", dataset="wikitext")


def test_nodes_to_exclude_by_module_name(onnx_tiny_dir, onnx_export, tmp_path):
    import onnx

    from pipeline.calibrate import quantize, resolve_nodes_to_exclude

    graph = onnx.load(str(onnx_export[0] / "model.onnx")).graph
    (lm_head,) = resolve_nodes_to_exclude(graph, ["lm_head"], ["MatMul"])
    assert next(n for n in graph.node if n.name == lm_head).output[0] == "logits"
    assert len(resolve_nodes_to_exclude(graph, ["model.layers.0.mlp.down_proj", lm_head], ["MatMul"])) == 2
    manifest = quantize(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", nodes_to_exclude=["lm_head"],
                        num_samples=2, seq_len=8)
    assert manifest["metrics"]["excluded_nodes"] == 1
    qdq = onnx.load(str(tmp_path / "q" / "model.onnx"))
    assert "logits" not in {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    head = next(n for n in qdq.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    assert not any(n.output[0] in head.input for n in qdq.graph.node if n.op_type == "DequantizeLinear")


def test_weight_matmuls_only_skips_attention_matmuls(onnx_tiny_dir, onnx_export, tmp_path):
    from pipeline.calibrate import quantize

    manifest = quantize(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", weight_matmuls_only=True,
                        num_samples=2, seq_len=8)
    assert manifest["metrics"]["excluded_nodes"] == 4 * 2  # scores and context MatMul per layer


# --- bad input: one-line PipelineError and no output directory (not even .partial) ------------------------------

def _bad(onnx_path, model_dir, out_dir, match, **kwargs):
    from pipeline.calibrate import quantize

    with pytest.raises(PipelineError, match=match) as e:
        quantize(onnx_path, model_dir, out_dir, **{"num_samples": 2, "seq_len": 8, **kwargs})
    assert "\n" not in str(e.value)
    assert not out_dir.exists() and not out_dir.with_name(out_dir.name + ".partial").exists()


def test_missing_onnx_file(onnx_tiny_dir, tmp_path):
    _bad(tmp_path / "none.onnx", onnx_tiny_dir, tmp_path / "q", "none.onnx: not found")


def test_empty_calibration_set(onnx_tiny_dir, onnx_export, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "calibration set is empty",
         corpus_path=tmp_path / "empty.txt")
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "num_samples must be >= 1", num_samples=0)


def test_sequence_length_beyond_max_positions(onnx_tiny_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "seq_len=512 plus one decode step exceeds "
         "max_position_embeddings=512", seq_len=512)


def test_more_samples_than_windows(onnx_tiny_dir, onnx_export, tmp_path):
    (tmp_path / "short.txt").write_text("The ferry left the island twice a day, once at dawn.")
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "exceeds the .* distinct windows",
         corpus_path=tmp_path / "short.txt", num_samples=50, seq_len=4)


def test_unknown_op_type(onnx_tiny_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "'Matmul' is not an op type onnxruntime can "
         "quantize", op_types=["Matmul"])
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", r"\['Conv'\]: none of them occurs",
         op_types=["Conv"])


def test_unknown_method_and_node(onnx_tiny_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "calibration.method must be one of",
         method="distribution")
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "'lm_haed' is neither a node name",
         nodes_to_exclude=["lm_haed"])


@pytest.mark.skipif(importlib.util.find_spec("neural_compressor") is not None, reason="neural-compressor installed")
def test_smoothquant_needs_neural_compressor(onnx_tiny_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "smoothquant_alpha=0.5 needs neural-compressor",
         smoothquant_alpha=0.5)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_dataset_needs_datasets_package(onnx_tiny_dir, onnx_export, tmp_path):
    _bad(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "q", "needs the `datasets` package",
         dataset="wikitext", dataset_config="wikitext-2-raw-v1")


def test_failed_recalibration_keeps_previous_output(onnx_tiny_dir, onnx_export, onnx_int8, tmp_path):
    import shutil

    from pipeline.calibrate import quantize

    out = tmp_path / "q"
    shutil.copytree(onnx_int8["minmax"][0], out)
    with pytest.raises(PipelineError):
        quantize(onnx_export[0] / "model.onnx", onnx_tiny_dir, out, op_types=["Matmul"])
    artifacts.verify_manifest(out)
    scales = [e["scale"] for e in json.loads((out / "calibration.json").read_text())["tensors"].values()]
    assert scales and np.isfinite(scales).all()

"""pipeline/export.py: ONNX decoder with KV cache vs the Hugging Face torch reference (reproducibility:
test_onnx_reproducible.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import artifacts
from pipeline.errors import PipelineError

pytest_plugins = ["tests.fixtures_onnx"]

ATOL = 1e-4


def test_parity_reported_by_export(onnx_export):
    metrics = onnx_export[1]["metrics"]
    assert metrics["prefill_max_abs_diff"] <= ATOL
    assert metrics["decode_max_abs_diff"] <= ATOL
    assert metrics["prefill_top1_agreement"] == 1.0 and metrics["decode_top1_agreement"] == 1.0


@torch.inference_mode()
def test_parity_prefill_then_multi_token_step_with_past(onnx_tiny_dir, onnx_export):
    """Independent of export's own check: batch 3, prefill 7 tokens, then 4 tokens at once on that past,
    then 1 token; each side feeds its own cache back."""
    from transformers import DynamicCache

    from pipeline.model.hf import load_hf_model
    from pipeline.onnx_io import empty_past_feeds, ort_session

    model = load_hf_model(onnx_tiny_dir)
    session = ort_session(onnx_export[0] / "model.onnx")
    gen = torch.Generator().manual_seed(7)
    cache, past, length = DynamicCache(config=model.config), empty_past_feeds(session, 3), 0
    for seq in (7, 4, 1):
        ids = torch.randint(2, model.config.vocab_size, (3, seq), generator=gen)
        mask = torch.ones(3, length + seq, dtype=torch.int64)
        pos = torch.arange(length, length + seq).expand(3, seq).contiguous()
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
        out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 "position_ids": pos.numpy(), **past})
        np.testing.assert_allclose(out[0], ref.numpy(), rtol=0, atol=ATOL)
        for i, layer in enumerate(cache.layers):  # presents match torch's cache too
            np.testing.assert_allclose(out[1 + 2 * i], layer.keys.numpy(), rtol=0, atol=ATOL)
            np.testing.assert_allclose(out[2 + 2 * i], layer.values.numpy(), rtol=0, atol=ATOL)
        names = [o.name.replace("present.", "past_key_values.") for o in session.get_outputs()[1:]]
        past, length = dict(zip(names, out[1:])), length + seq
    assert length == 12


def test_parity_inputs_text_with_tokenizer(onnx_tiny_dir, onnx_export):
    from pipeline.export import PARITY_PROMPTS, parity_rows
    from pipeline.model.hf import load_tokenizer

    assert onnx_export[1]["parity_inputs"] == "text"
    rows, kind = parity_rows(onnx_tiny_dir, PARITY_PROMPTS)
    tokenizer = load_tokenizer(onnx_tiny_dir)
    assert kind == "text" and rows == [tokenizer(p).input_ids for p in PARITY_PROMPTS]
    assert onnx_export[1]["metrics"]["parity_positions"] == sum(map(len, rows)) + len(rows)


def test_parity_rows_without_tokenizer_are_seeded_random_ids(onnx_notok_dir):
    from pipeline.export import PARITY_PROMPTS, PARITY_RANDOM_LENGTHS, parity_rows
    from pipeline.model.hf import has_tokenizer, load_tokenizer

    assert not has_tokenizer(onnx_notok_dir)
    rows, kind = parity_rows(onnx_notok_dir, PARITY_PROMPTS)
    assert kind == "random-ids" and tuple(map(len, rows)) == PARITY_RANDOM_LENGTHS
    assert len(set(PARITY_RANDOM_LENGTHS)) == len(rows) > 1  # different lengths: the batch is left-padded
    flat = np.concatenate(rows)
    assert flat.min() >= 0 and flat.max() < 512 and len(np.unique(flat)) > len(flat) // 2
    assert parity_rows(onnx_notok_dir, PARITY_PROMPTS)[0] == rows
    with pytest.raises(PipelineError, match="tokenizer.json: not found"):
        load_tokenizer(onnx_notok_dir)


def _reuse_graph(monkeypatch, model):
    """Replace the exporter with a save of an already exported graph (the exporter itself is tested above)."""
    import onnx

    from pipeline import export

    monkeypatch.setattr(export, "_torch_export", lambda m, path, opset, ext: onnx.save(model, str(path)))


def test_export_without_tokenizer_checks_parity_on_random_ids(onnx_notok_dir, onnx_export, tmp_path, monkeypatch):
    """A random preset without tokenizer still exports, checked on random ids and labelled so; a wrong
    graph is still rejected on those ids."""
    import onnx
    from onnx import numpy_helper

    from pipeline.export import PARITY_RANDOM_LENGTHS, export_onnx

    model = onnx.load(str(onnx_export[0] / "model.onnx"))
    _reuse_graph(monkeypatch, model)
    manifest = export_onnx(onnx_notok_dir, tmp_path / "onnx")
    assert manifest["parity_inputs"] == "random-ids"
    assert artifacts.verify_manifest(tmp_path / "onnx")["parity_inputs"] == "random-ids"
    metrics = manifest["metrics"]
    assert metrics["parity_positions"] == sum(PARITY_RANDOM_LENGTHS) + len(PARITY_RANDOM_LENGTHS)
    assert metrics["prefill_max_abs_diff"] <= ATOL and metrics["decode_max_abs_diff"] <= ATOL
    assert metrics["prefill_top1_agreement"] == 1.0 and metrics["decode_top1_agreement"] == 1.0

    lm_head = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    init = next(i for i in model.graph.initializer if i.name == lm_head.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    with pytest.raises(PipelineError, match="differ from torch by .* > export.parity_atol") as e:
        export_onnx(onnx_notok_dir, tmp_path / "bad")
    _fails_cleanly(e, tmp_path / "bad")


def test_one_graph_with_named_dynamic_dims(onnx_export):
    import onnx

    graph = onnx.load(str(onnx_export[0] / "model.onnx"), load_external_data=False).graph

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = dims(graph.input), dims(graph.output)
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "seq"] and inputs["position_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "total_seq"]
    assert list(outputs)[0] == "logits" and outputs["logits"] == ["batch", "seq", 512]
    for i in range(4):  # tiny: 4 layers, 2 KV heads, head_dim 8
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"] == ["batch", 2, "past_seq", 8]
            assert outputs[f"present.{i}.{kind}"] == ["batch", 2, "past_seq + seq", 8]
    assert len(inputs) == 3 + 8 and len(outputs) == 1 + 8


def test_manifest_last_with_graph_statistics(onnx_export):
    from pipeline.onnx_io import count_ops

    out_dir, manifest = onnx_export
    assert artifacts.verify_manifest(out_dir)["kind"] == "onnx-model"
    assert [f["path"] for f in manifest["files"]] == ["model.onnx"]  # small model: no external data
    assert not out_dir.with_name(out_dir.name + ".partial").exists()
    graph = manifest["graph"]
    assert graph["ops_before"] == count_ops(out_dir / "model.onnx")
    # 7 projections per layer + lm_head are MatMuls before ORT fuses anything.
    assert graph["ops_before"]["MatMul"] >= 4 * 7 + 1
    assert manifest["metrics"]["nodes_before"] == sum(graph["ops_before"].values())
    assert manifest["metrics"]["nodes_after_ort"] == sum(graph["ops_after_ort"].values()) > 0
    assert graph["ops_before"] != graph["ops_after_ort"]  # ORT rewrote something (e.g. FusedMatMul)
    assert json.loads((out_dir / "manifest.json").read_text())["opset"] == 18


def _fails_cleanly(exc_info, out_dir):
    assert "\n" not in str(exc_info.value)
    assert not out_dir.exists() and not out_dir.with_name(out_dir.name + ".partial").exists()


def test_missing_model_dir(tmp_path):
    from pipeline.export import export_onnx

    with pytest.raises(PipelineError, match="config.json: not found") as e:
        export_onnx(tmp_path / "nope", tmp_path / "onnx")
    _fails_cleanly(e, tmp_path / "onnx")


def test_not_a_llama(tmp_path):
    from pipeline.export import export_onnx

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(PipelineError, match="model_type is 'gpt2'") as e:
        export_onnx(tmp_path / "m", tmp_path / "onnx")
    _fails_cleanly(e, tmp_path / "onnx")


def test_opset_below_dynamo_minimum(onnx_tiny_dir, tmp_path):
    from pipeline.export import export_onnx

    with pytest.raises(PipelineError, match="export.opset must be >= 18") as e:
        export_onnx(onnx_tiny_dir, tmp_path / "onnx", opset=17)
    _fails_cleanly(e, tmp_path / "onnx")


def test_parity_failure_leaves_no_artifact(onnx_tiny_dir, onnx_export, tmp_path, monkeypatch):
    """A graph that disagrees with torch is rejected. The exporter is replaced by a copy of the real
    export with its lm_head weight scaled (fast), so the check itself is what fails."""
    import onnx
    from onnx import numpy_helper

    from pipeline import export

    model = onnx.load(str(onnx_export[0] / "model.onnx"))
    lm_head = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    init = next(i for i in model.graph.initializer if i.name == lm_head.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))

    monkeypatch.setattr(export, "_torch_export", lambda m, path, opset, ext: onnx.save(model, str(path)))
    with pytest.raises(PipelineError, match="differ from torch by .* > export.parity_atol") as e:
        export.export_onnx(onnx_tiny_dir, tmp_path / "onnx")
    _fails_cleanly(e, tmp_path / "onnx")


def test_reexport_replaces_previous_atomically(onnx_tiny_dir, onnx_export, tmp_path, monkeypatch):
    """A failed re-export keeps the previous artifact intact (atomic_dir)."""
    from pipeline import export

    out = tmp_path / "onnx"
    shutil.copytree(onnx_export[0], out)

    def boom(*args):
        raise PipelineError("model.onnx: torch.onnx.export (dynamo) failed for this model (simulated)")

    monkeypatch.setattr(export, "_torch_export", boom)
    with pytest.raises(PipelineError, match="simulated"):
        export.export_onnx(onnx_tiny_dir, out)
    artifacts.verify_manifest(out)


def test_external_data_path(onnx_tiny_dir, onnx_export, tmp_path, monkeypatch):
    """Models over 2 GB go to model.onnx + model.onnx.data. The tiny model is forced over the threshold;
    to keep the test fast the exporter call is replaced by a save of the real export with external data
    (torch's own external_data=True writer was checked by hand: same files, same parity)."""
    import onnx

    from pipeline import export
    from pipeline.calibrate import quantize
    from pipeline.evaluate import heldout_sequences, onnx_logits

    model = onnx.load(str(onnx_export[0] / "model.onnx"))
    calls = []

    def save_external(m, path, opset, external):
        calls.append(external)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")  # small constants stay inline, as torch's writer does

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(export, "_torch_export", save_external)
    manifest = export.export_onnx(onnx_tiny_dir, tmp_path / "onnx")
    assert calls == [True] and manifest["external_data"] is True
    assert [f["path"] for f in manifest["files"]] == ["model.onnx", "model.onnx.data"]
    assert manifest["metrics"]["prefill_max_abs_diff"] <= ATOL
    q = quantize(tmp_path / "onnx" / "model.onnx", onnx_tiny_dir, tmp_path / "int8", num_samples=2, seq_len=8)
    assert {f["path"] for f in q["files"]} == {"calibration.json", "model.onnx", "model.onnx.data"}
    seqs = heldout_sequences(onnx_tiny_dir, seq_len=16, max_sequences=1)
    np.testing.assert_allclose(onnx_logits(tmp_path / "onnx" / "model.onnx", seqs),
                               onnx_logits(onnx_export[0] / "model.onnx", seqs), rtol=0, atol=1e-6)

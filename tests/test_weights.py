"""Stage `weights` library: seeded presets, local directories, hub snapshots (mocked), manifests."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import artifacts, weights
from pipeline.compose import compose_params
from pipeline import config
from pipeline.errors import PipelineError
from pipeline.model.random_init import tensor_specs
from tests.conftest import ROOT


def test_preset_is_a_loadable_llama3_with_gqa_and_llama3_rope(tiny_model_dir, default_cfg):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (8, 2, 4)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.hidden_act == "silu"
    # llama3 scaling divides the low frequencies by `factor` (8): unscaled inv_freq[1] = theta^(-2/8).
    unscaled = 500000.0 ** (-2 / 8)
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(unscaled / 8, rel=1e-5)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "The harbour town woke slowly on winter mornings."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < cfg.vocab_size
    assert tok.convert_tokens_to_ids("<|begin_of_text|>") == default_cfg.model.bos_token_id
    assert tok.convert_tokens_to_ids("<|end_of_text|>") == default_cfg.model.eos_token_id


def test_preset_is_bit_identical_across_runs(tiny_model_dir, default_cfg, tmp_path):
    again = weights.build(default_cfg.model, tmp_path / "again")
    first = artifacts.read_manifest(tiny_model_dir)
    digest = {f["path"]: f["sha256"] for f in first["files"]}
    assert {f["path"]: f["sha256"] for f in again["files"]} == digest
    # The manifest too (no timestamps), so a rebuild changes nothing DVC would rerun downstream.
    assert (tmp_path / "again/manifest.json").read_bytes() == (tiny_model_dir / "manifest.json").read_bytes()
    other_seed = dataclasses.replace(default_cfg.model, seed=7)
    changed = weights.build(other_seed, tmp_path / "seed7")
    changed_digest = {f["path"]: f["sha256"] for f in changed["files"]}
    assert changed_digest["model.safetensors"] != digest["model.safetensors"]


def test_manifest_describes_the_artifact(tiny_model_dir):
    manifest = artifacts.verify_manifest(tiny_model_dir)
    assert manifest["source"] == "preset" and manifest["model"] == "tiny" and manifest["seed"] == 1234
    assert manifest["training"]["steps"] == 150 and manifest["training"]["loss_last"] < manifest["training"]["loss_first"]
    assert manifest["parameter_count"] == 254_528
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["config"]["num_key_value_heads"] == 2 and manifest["versions"]["torch"]


@pytest.mark.parametrize("name,expected", [("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496)])
def test_full_size_presets_have_the_published_parameter_counts(name, expected):
    cfg = config.from_dict(compose_params(ROOT / "conf", [f"model={name}", "model.source=preset"]))
    total = sum(torch.Size(shape).numel() for _, shape, _ in tensor_specs(cfg.model))
    assert total == expected


def test_local_source_copies_only_safe_files_and_checks_the_shape(tiny_model_dir, default_cfg, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"pickle")  # must not be copied
    local = dataclasses.replace(default_cfg.model, source="local", local_dir=str(src), tokenizer="source")
    manifest = weights.build(local, tmp_path / "out")
    names = {f["path"] for f in manifest["files"]}
    assert "pytorch_model.bin" not in names and "model.safetensors" in names
    assert manifest["source"] == "local" and manifest["parameter_count"] == 254_528
    wrong = dataclasses.replace(local, num_layers=32)
    with pytest.raises(PipelineError, match=r"num_hidden_layers=4 but model.num_layers=32"):
        weights.build(wrong, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "wrong.partial").exists()
    # The tiny model is stored as float32: a dtype that would need a conversion is refused, not ignored.
    half = dataclasses.replace(local, dtype="bfloat16")
    with pytest.raises(PipelineError, match=r"weights are stored as float32 but model.dtype=bfloat16; .*set "
                                            r"model.dtype=null"):
        weights.build(half, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert weights.build(dataclasses.replace(local, dtype=None), tmp_path / "as-stored")["dtype"] == "float32"


def test_local_source_refuses_pickles_and_corrupt_safetensors(tiny_model_dir, default_cfg, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    local = dataclasses.replace(default_cfg.model, source="local", local_dir=str(src), tokenizer="source")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"model.safetensors: unreadable safetensors file"):
        weights.build(local, tmp_path / "out")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"no \*.safetensors .*pytorch_model.bin: pickle checkpoints are refused"):
        weights.build(local, tmp_path / "out")
    missing = dataclasses.replace(local, local_dir=str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="nowhere is not a directory"):
        weights.build(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_source_pins_the_revision_and_keeps_the_token_out_of_outputs(tiny_model_dir, default_cfg, tmp_path,
                                                                           monkeypatch):
    import huggingface_hub

    calls = {}

    from huggingface_hub.hf_api import RepoSibling

    files = [p for p in tiny_model_dir.iterdir() if p.name != "manifest.json"]

    class FakeApi:
        def __init__(self, token=None):
            calls["api_token"] = token

        def model_info(self, repo_id, revision=None, files_metadata=False):
            calls["info"] = (repo_id, revision, files_metadata)
            # the listing also holds files that the allow patterns leave out
            siblings = [RepoSibling(p.name, size=p.stat().st_size) for p in files] + [
                RepoSibling("original/consolidated.00.pth", size=10**12), RepoSibling("README.md", size=10**12)]
            return type("Info", (), {"sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings})()

    def fake_snapshot_download(repo_id, revision, local_dir, allow_patterns, token):
        calls["download"] = dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, token=token)
        for p in files:
            shutil.copy(p, Path(local_dir) / p.name)
        (Path(local_dir) / ".cache").mkdir()
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    hub = dataclasses.replace(default_cfg.model, source="hub", hub_id="org/tiny-llama3", revision="main",
                              tokenizer="source")
    manifest = weights.build(hub, tmp_path / "out")
    assert calls["info"] == ("org/tiny-llama3", "main", True)
    assert calls["download"]["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert calls["download"]["token"] == "hf_secret_value" == calls["api_token"]
    assert "*.safetensors" in calls["download"]["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", "*")) for p in calls["download"]["allow_patterns"])
    assert manifest["resolved_revision"].startswith("0123456789") and manifest["hub_id"] == "org/tiny-llama3"
    assert not (tmp_path / "out" / ".cache").exists()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"hf_secret_value" not in path.read_bytes(), path


def test_hub_errors_are_one_line(default_cfg, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    class GatedApi:
        def __init__(self, token=None):
            pass

        def model_info(self, repo_id, revision=None, files_metadata=False):
            # Built without an HTTP response object: only the type matters to the code under test.
            error = GatedRepoError.__new__(GatedRepoError)
            Exception.__init__(error, "403 gated")
            raise error

    monkeypatch.setattr(huggingface_hub, "HfApi", GatedApi)
    hub = dataclasses.replace(default_cfg.model, source="hub", hub_id="meta-llama/Meta-Llama-3-8B",
                              tokenizer="source")
    with pytest.raises(PipelineError, match="gated repository; accept its licence .* export HF_TOKEN"):
        weights.build(hub, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_presets_write_an_index(default_cfg, tmp_path, monkeypatch):
    from pipeline.model import random_init
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(random_init, "SHARD_BYTES", 300_000)
    manifest = weights.build(dataclasses.replace(default_cfg.model, train_steps=0), tmp_path / "sharded")
    names = sorted(f["path"] for f in manifest["files"])
    assert "model.safetensors.index.json" in names and "model-00001-of-00004.safetensors" in names
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(tensor_specs(default_cfg.model))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    assert sum(p.numel() for p in model.parameters()) == manifest["parameter_count"] == 254_528


def test_random_preset_with_source_tokenizer_has_none_and_says_so(default_cfg, tmp_path):
    # e.g. `model=llama3-8b model.source=preset`: real shape, random weights, no checkpoint tokenizer.
    preset = dataclasses.replace(default_cfg.model, tokenizer="source", train_steps=0)
    manifest = weights.build(preset, tmp_path / "out")
    assert manifest["tokenizer"] is False and not (tmp_path / "out/tokenizer.json").exists()
    assert manifest["parameter_count"] == 254_528


def test_local_checkpoint_without_tokenizer_is_refused(tiny_model_dir, default_cfg, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "tokenizer.json").unlink()
    local = dataclasses.replace(default_cfg.model, source="local", local_dir=str(src), tokenizer="source")
    with pytest.raises(PipelineError, match="no tokenizer.json"):
        weights.build(local, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_copy_is_identical_in_any_output_directory(tiny_model_dir, default_cfg, tmp_path):
    """The same config gives the same bytes wherever the artifact is built (another clone, DVC's temp
    workspace): nothing in the directory names where it was written."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    local = dataclasses.replace(default_cfg.model, source="local", local_dir=str(src), tokenizer="source")
    one, two = tmp_path / "a" / "weights", tmp_path / "clone" / "artifacts" / "weights"
    weights.build(local, one)
    weights.build(local, two)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in one.iterdir():
        assert p.read_bytes() == (two / p.name).read_bytes(), p.name
        assert str(one).encode() not in p.read_bytes(), p.name

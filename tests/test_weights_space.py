"""Stage `weights`: free space is checked, and the plan announced, before anything is written."""

from __future__ import annotations

import dataclasses
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from pipeline import artifacts, config, weights
from pipeline.compose import compose_params
from pipeline.errors import PipelineError
from tests.conftest import ROOT

Usage = namedtuple("Usage", "total used free")
LLAMA3_8B_BF16 = 8_030_261_248 * 2  # published parameter count x 2 bytes


def _free(monkeypatch, free: int) -> list[Path]:
    """Make every filesystem report `free` bytes free; returns the paths asked about."""
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return Usage(10 * free + 1, 9 * free + 1, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def _no_writes(monkeypatch):
    """Fail the test if any weights are generated."""
    from pipeline.model import random_init

    def refuse(*args, **kwargs):
        raise AssertionError("weights were written although the space check should have stopped the build")

    monkeypatch.setattr(random_init, "write_random_weights", refuse)


class Stop(Exception):
    pass


def _preset_8b():
    return config.from_dict(compose_params(ROOT / "conf", ["model=llama3-8b", "model.source=preset"])).model


def _nothing_at(out: Path):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_preset_without_room_fails_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "artifacts" / "weights"  # parents do not exist yet: the nearest existing one is asked
    asked = _free(monkeypatch, 10_000_000_000)
    _no_writes(monkeypatch)
    with pytest.raises(PipelineError) as e:
        weights.build(_preset_8b(), out)
    needed = LLAMA3_8B_BF16 + weights.OVERHEAD_BYTES
    assert str(e.value) == (f"{out}: needs {needed} bytes (16.13 GB) but 10000000000 bytes (10.00 GB) are free on "
                            f"its filesystem; free some space (e.g. dvc gc -w) or move the project to a larger disk")
    assert asked == [tmp_path]
    _nothing_at(out)
    assert "weights: writing" not in capsys.readouterr().err  # nothing announced that will not happen


def test_preset_with_room_announces_size_dtype_and_time(tmp_path, monkeypatch, capsys):
    from pipeline.model import random_init

    out = tmp_path / "weights"
    _free(monkeypatch, LLAMA3_8B_BF16 + weights.OVERHEAD_BYTES)  # exactly enough

    def stop(model, out_dir):
        raise Stop  # the announcement is what is under test, not 16 GB of writing

    monkeypatch.setattr(random_init, "write_random_weights", stop)
    with pytest.raises(Stop):
        weights.build(_preset_8b(), out)
    err = capsys.readouterr().err
    line = (f"weights: writing 16.06 GB of random llama3-8b weights (bfloat16) to {out}; about 2 min at "
            f"~150 MB/s\n")
    assert line in err, err
    _nothing_at(out)


def test_leftover_partial_counts_as_free(tmp_path, monkeypatch):
    out = tmp_path / "weights"
    partial = tmp_path / "weights.partial"
    partial.mkdir()
    (partial / "model-00001-of-00004.safetensors").write_bytes(b"x" * 1000)  # debris of a killed run
    _free(monkeypatch, 500)
    assert artifacts.check_free_space(out, 1500) == 1500  # atomic_dir removes the debris first
    with pytest.raises(PipelineError, match=rf"{out}: needs 1501 bytes \(1.50 kB\) but 1500 bytes"):
        artifacts.check_free_space(out, 1501)


def test_local_copy_needs_the_source_size(tiny_model_dir, default_cfg, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"x" * 10**6)  # not copied, so not counted
    copied = sum(p.stat().st_size for p in src.iterdir()
                 if p.suffix in (".json", ".safetensors") and p.name != artifacts.MANIFEST)
    local = dataclasses.replace(default_cfg.model, source="local", local_dir=str(src), tokenizer="source")
    _free(monkeypatch, copied + weights.OVERHEAD_BYTES - 1)
    with pytest.raises(PipelineError, match=rf"needs {copied + weights.OVERHEAD_BYTES} bytes .* but "
                                            rf"{copied + weights.OVERHEAD_BYTES - 1} bytes"):
        weights.build(local, tmp_path / "out")
    _nothing_at(tmp_path / "out")

    _free(monkeypatch, copied + weights.OVERHEAD_BYTES)
    manifest = weights.build(local, tmp_path / "out")
    assert sum(f["bytes"] for f in manifest["files"] if f["path"] != "manifest.json") == copied
    assert f"weights: copying {artifacts.human_bytes(copied)} from {src} to {tmp_path / 'out'}; about 1 s" \
        in capsys.readouterr().err


def _fake_hub(monkeypatch, tiny_model_dir, sizes: bool):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling

    files = [p for p in tiny_model_dir.iterdir() if p.name != "manifest.json"]
    downloads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def model_info(self, repo_id, revision=None, files_metadata=False):
            siblings = [RepoSibling(p.name, size=p.stat().st_size if sizes and files_metadata else None)
                        for p in files]
            siblings.append(RepoSibling("original/consolidated.00.pth", size=10**12 if sizes else None))
            return type("Info", (), {"sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings})()

    def fake_snapshot_download(repo_id, revision, local_dir, allow_patterns, token):
        downloads.append(repo_id)
        for p in files:
            shutil.copy(p, Path(local_dir) / p.name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return sum(p.stat().st_size for p in files), downloads


def test_hub_download_size_comes_from_the_listing(tiny_model_dir, default_cfg, tmp_path, monkeypatch, capsys):
    listed, downloads = _fake_hub(monkeypatch, tiny_model_dir, sizes=True)
    hub = dataclasses.replace(default_cfg.model, source="hub", hub_id="org/tiny-llama3", revision="main",
                              tokenizer="source")
    _free(monkeypatch, listed)  # the .pth the patterns skip is not counted, the overhead is
    with pytest.raises(PipelineError, match=rf"needs {listed + weights.OVERHEAD_BYTES} bytes"):
        weights.build(hub, tmp_path / "out")
    assert downloads == []
    _nothing_at(tmp_path / "out")

    _free(monkeypatch, 10**12)
    weights.build(hub, tmp_path / "out")
    assert downloads == ["org/tiny-llama3"]
    assert (f"weights: downloading {artifacts.human_bytes(listed)} of org/tiny-llama3@0123456789ab to "
            f"{tmp_path / 'out'}; about 1 s at ~100 MB/s") in capsys.readouterr().err


def test_hub_listing_without_sizes_downloads_unchecked(tiny_model_dir, default_cfg, tmp_path, monkeypatch, capsys):
    _, downloads = _fake_hub(monkeypatch, tiny_model_dir, sizes=False)
    asked = _free(monkeypatch, 0)
    hub = dataclasses.replace(default_cfg.model, source="hub", hub_id="org/tiny-llama3", revision="main",
                              tokenizer="source")
    weights.build(hub, tmp_path / "out")
    assert downloads == ["org/tiny-llama3"] and asked == []
    assert "weights: downloading org/tiny-llama3@0123456789ab to" in capsys.readouterr().err


@pytest.mark.parametrize("n,text", [(0, "0 B"), (999, "999 B"), (1500, "1.50 kB"), (LLAMA3_8B_BF16, "16.06 GB"),
                                    (141_107_412_992, "141.11 GB"), (3 * 10**15, "3000.00 TB")])
def test_human_bytes(n, text):
    assert artifacts.human_bytes(n) == text

"""What both checkpoint formats share: reading the Hugging Face source and checking
a rank's files against manifest.json before anything loads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.model import hf_tensors
from pipeline.model.args import LlamaArgs
from pipeline.precision import FLOAT_PRECISIONS, torch_dtype

def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in FLOAT_PRECISIONS:
        raise PipelineError(f"convert.dtype must be one of {', '.join(FLOAT_PRECISIONS)}; got {dtype!r}")
    return torch_dtype(dtype)


class HFCheckpoint:
    """A Hugging Face Llama directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        config = self.dir / "config.json"
        if not config.is_file():
            raise PipelineError(f"{config}: not found; expected a Hugging Face model directory (run the weights stage)")
        try:
            self.raw_config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{config}: not valid JSON ({e.msg})") from None
        self.args = LlamaArgs.from_hf_config(self.raw_config, str(config))
        self.files = self._weight_files()

    def _weight_files(self) -> dict[str, Path]:
        from safetensors import SafetensorError, safe_open

        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.dir / file for name, file in weight_map.items()}
        single = self.dir / "model.safetensors"
        if not single.is_file():
            raise PipelineError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise PipelineError(f"{single}: unreadable safetensors ({e}); re-create the model directory") from None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.files[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise PipelineError(f"{path}: cannot read {name} ({e})") from None

    def check_names(self, fmt: str) -> None:
        """Exactly the names Llama has: anything extra (biases, rotary buffers) has no place in `fmt`."""
        expected = set(hf_tensors.names(self.args))
        found = set(self.files)
        if self.args.tie_word_embeddings:
            found.discard("lm_head.weight")  # some tied checkpoints still store a copy
        leftover = sorted(found - expected)
        if leftover:
            raise PipelineError(f"{self.dir}: tensor '{leftover[0]}' has no {fmt} name ({len(leftover)} unmapped)")
        missing = sorted(expected - found)
        if missing:
            raise PipelineError(f"{self.dir}: tensor '{missing[0]}' is missing ({len(missing)} missing)")

    def lineage(self) -> dict[str, Any]:
        manifest = self.dir / artifacts.MANIFEST
        return {"source_model_dir": str(self.dir),
                "source_manifest_sha256": artifacts.sha256_file(manifest) if manifest.is_file() else None}


def verify_files(root: Path, needed: Iterable[str]) -> dict[str, Any]:
    """Before loading: every file in manifest.json has its recorded size, and the files this rank reads
    (`needed`, relative paths) also their sha256. Hashing only a rank's own files keeps N ranks from
    each hashing the whole checkpoint."""
    root = Path(root)
    manifest = artifacts.read_manifest(root)
    entries = {e["path"]: e for e in manifest["files"]}
    for path, entry in entries.items():
        p = root / path
        if not p.is_file():
            raise PipelineError(f"{p}: listed in {artifacts.MANIFEST} but missing; reconvert the checkpoint")
        if p.stat().st_size != entry["bytes"]:
            raise PipelineError(f"{p}: size {p.stat().st_size} != {entry['bytes']} in {artifacts.MANIFEST} "
                                f"(truncated or replaced); reconvert the checkpoint")
    for path in needed:
        if path not in entries:
            raise PipelineError(f"{root / path}: not listed in {artifacts.MANIFEST}; reconvert the checkpoint")
        if artifacts.verified_sha256(root / path) != entries[path]["sha256"]:
            raise PipelineError(f"{root / path}: sha256 differs from {artifacts.MANIFEST} (corrupt or replaced)")
    return manifest

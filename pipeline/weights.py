"""Stage `weights`: materialise the configured model as a Hugging Face directory plus manifest.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.model import hf_config, sources
from pipeline.progress import console
from pipeline.versions import library_versions


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                n = 1
                for dim in f.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


# Rough rates for the "about N min" line only. Random init: one CPU generating seeded normal values,
# casting and writing them (a 4096x14336 bfloat16 tensor ran at ~157 MB/s on a 2-core build machine).
# Copy and download: typical local SSD and a good network link; the real rates vary widely.
RANDOM_INIT_BYTES_PER_S = 150e6
COPY_BYTES_PER_S = 500e6
DOWNLOAD_BYTES_PER_S = 100e6
# config.json, tokenizer files, safetensors headers, the manifest, and train_tiny's one-file rewrite of
# the tiny model: room needed on top of the tensor bytes.
OVERHEAD_BYTES = 64 << 20


@dataclass(frozen=True)
class _Plan:
    nbytes: int | None  # bytes of weights about to be written (None: the hub listing gave no sizes)
    announcement: str
    source: Any = None  # local: (config.json, files); hub: sources.HubSnapshot


def _about(nbytes: int, rate: float) -> str:
    seconds = nbytes / rate
    if seconds < 90:
        when = f"about {max(1, round(seconds))} s"
    elif seconds < 90 * 60:
        when = f"about {round(seconds / 60)} min"
    else:
        when = f"about {seconds / 3600:.1f} h"
    return f"{when} at ~{rate / 1e6:.0f} MB/s"


def _plan(model: ModelConfig, out_dir: Path) -> _Plan:
    """What build is about to write and how big it is, found without writing anything (the hub is asked
    for its file listing)."""
    if model.source == "preset":
        import torch

        from pipeline.model.random_init import tensor_specs

        itemsize = torch.empty((), dtype=getattr(torch, model.dtype)).element_size()
        nbytes = sum(itemsize * torch.Size(shape).numel() for _, shape, _ in tensor_specs(model))
        then = f"; then {model.train_steps} training steps" if model.train_steps else ""
        return _Plan(nbytes, f"weights: writing {artifacts.human_bytes(nbytes)} of random {model.name} weights "
                             f"({model.dtype}) to {out_dir}; {_about(nbytes, RANDOM_INIT_BYTES_PER_S)}{then}")
    if model.source == "local":
        raw_config, files = sources.local_files(Path(model.local_dir))
        hf_config.check_declared_shape(model, raw_config, str(Path(model.local_dir) / "config.json"))
        nbytes = sum(p.stat().st_size for p in files)
        return _Plan(nbytes, f"weights: copying {artifacts.human_bytes(nbytes)} from {files[0].parent} to {out_dir}; "
                             f"{_about(nbytes, COPY_BYTES_PER_S)}", (raw_config, files))
    snapshot = sources.resolve_hub(model.hub_id, model.revision)
    what = f"{model.hub_id}@{snapshot.sha[:12]}"
    nbytes = snapshot.total_bytes
    if nbytes is None:
        return _Plan(None, f"weights: downloading {what} to {out_dir}; the hub listing gave no file sizes, so "
                           f"free space is not checked", snapshot)
    return _Plan(nbytes, f"weights: downloading {artifacts.human_bytes(nbytes)} of {what} to {out_dir}; "
                         f"{_about(nbytes, DOWNLOAD_BYTES_PER_S)}", snapshot)


def build(model: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Write the model directory atomically; return its manifest. The free space on out_dir's
    filesystem is checked before anything is written."""
    out_dir = Path(out_dir)
    plan = _plan(model, out_dir)
    if plan.nbytes is not None:
        artifacts.check_free_space(out_dir, plan.nbytes + OVERHEAD_BYTES)
    console.print(plan.announcement, markup=False, highlight=False, soft_wrap=True)  # one line, unwrapped
    with artifacts.atomic_dir(out_dir) as tmp:
        resolved_revision, training = None, None
        if model.source == "preset":
            from pipeline.model.random_init import write_random_weights
            from pipeline.model.tokenizer import train_embedded_tokenizer

            config = hf_config.llama_config(model)
            config.save_pretrained(str(tmp))
            write_random_weights(model, tmp)
            if model.tokenizer == "embedded":
                train_embedded_tokenizer(model, tmp)
            if model.train_steps:
                from pipeline.model.tokenizer import CORPUS
                from pipeline.model.train_tiny import train_tiny

                training = train_tiny(tmp, CORPUS, steps=model.train_steps, seed=model.seed, lr=model.train_lr)
            raw_config = json.loads((tmp / "config.json").read_text())
        elif model.source == "local":
            raw_config, files = plan.source
            sources.copy_files(files, tmp)
        else:
            raw_config = sources.download_hub(plan.source, tmp)
            resolved_revision = plan.source.sha
            hf_config.check_declared_shape(model, raw_config, f"{model.hub_id}/config.json")
        shape = hf_config.shape_from_hf(raw_config)
        # A random preset with tokenizer=source has no tokenizer (the benchmark feeds random ids); a real
        # checkpoint without one is incomplete.
        if model.source != "preset" and not (tmp / "tokenizer.json").is_file():
            raise PipelineError(f"{model.local_dir or model.hub_id}: no tokenizer.json; the accuracy stages need "
                                f"the model's tokenizer")
        manifest = artifacts.write_manifest(
            tmp,
            kind="hf-model",
            model=model.name,
            source=model.source,
            hub_id=model.hub_id,
            revision=model.revision,
            resolved_revision=resolved_revision,
            local_dir=model.local_dir,
            seed=model.seed if model.source == "preset" else None,
            # train_s stays out: the manifest must not change when nothing but the clock did.
            training={k: v for k, v in training.items() if k != "train_s"} if training else None,
            dtype=model.dtype if model.source == "preset" else raw_config.get("dtype", raw_config.get("torch_dtype")),
            parameter_count=parameter_count(tmp),
            tokenizer=(tmp / "tokenizer.json").is_file(),
            shape=shape,
            config=raw_config,
            versions=library_versions(),
        )
    return manifest

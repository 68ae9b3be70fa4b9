"""Stage `weights`: materialise the configured model as a Hugging Face directory plus manifest.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.model import hf_config, sources
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


def build(model: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Write the model directory atomically; return its manifest."""
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
            raw_config = sources.copy_local(Path(model.local_dir), tmp)
            hf_config.check_declared_shape(model, raw_config, str(Path(model.local_dir) / "config.json"))
        else:
            raw_config, resolved_revision = sources.download_hub(model.hub_id, model.revision, tmp)
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

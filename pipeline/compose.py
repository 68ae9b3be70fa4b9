"""conf/ -> params.yaml, with the same Hydra composition `dvc exp run` uses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config
from pipeline.artifacts import atomic_write_text
from pipeline.errors import ConfigError

PARAMS_HEADER = (
    "# Generated from conf/ by `python -m pipeline compose` (or `dvc exp run`). Do not edit by hand:\n"
    "# edit conf/ or pass overrides, e.g. `python -m pipeline compose precision=bf16 parallel.tp=2`.\n"
)


def compose_dict(conf_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides into a plain dict (not yet validated)."""
    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"{conf_dir / 'config.yaml'}: not found; run from the repository root")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra appends its search path to every message; the first part is what the user needs.
        message = " ".join(str(e).split()).split(" Config search path")[0]
        unknown = re.match(r"Could not override '([^']+)'", message)
        parent = unknown.group(1).rpartition(".")[0] if unknown else ""
        keys = config.schema_keys()
        if unknown and parent in keys and not any(k.startswith(parent + ".") for k in keys):
            # A new entry of a mapping setting (serving.slo, hardware.peak_tflops): Hydra needs the `+`.
            raise ConfigError(f"override: {unknown.group(1)} adds an entry to the mapping {parent}; write "
                              f"+{unknown.group(1)}=<value> (and ~{parent}.<key> to remove one)") from None
        if unknown and unknown.group(1) not in config.schema_keys():
            # Hydra would advise adding the key with `+`; a mistyped key needs the closest valid one instead.
            raise ConfigError(f"override: {config.unknown_key_message(unknown.group(1))}") from None
        raise ConfigError(f"conf/: {message}") from None


def compose_params(conf_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    raw = compose_dict(conf_dir, overrides)
    config.from_dict(raw, source="conf/ (composed)")
    return raw


def write_params(raw: dict[str, Any], path: Path) -> None:
    text = PARAMS_HEADER + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)
    atomic_write_text(Path(path), text)

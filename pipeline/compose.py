"""conf/ -> params.yaml, with the same Hydra composition `dvc exp run` uses."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
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
    except yaml.YAMLError as e:  # Hydra lets PyYAML's error through; its mark names the conf/ file
        raise ConfigError(config.yaml_error(e, str(conf_dir))) from None
    except UnicodeDecodeError:
        raise ConfigError(_undecodable(conf_dir)) from None
    except MissingConfigException as e:
        raise ConfigError(_missing_option(e, conf_dir, overrides)) from None
    except OverrideParseException as e:
        raise ConfigError(f"override {e.override}: {e.message.splitlines()[0]} (Hydra override syntax: "
                          f"key=value, key=[a,b], +key=value to add, ~key to remove)") from None
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra appends its search path to every message; the first part is what the user needs.
        message = " ".join(str(e).split()).split(" Config search path")[0]
        merging = re.match(r"Error merging override (.+)", message)
        if merging:
            # Hydra merges the value into conf/'s plain one before the schema sees it: check it against the schema
            # here, so the error is the one params.yaml would get.
            override = OverridesParser.create().parse_override(merging.group(1))
            try:
                config.check_setting(override.key_or_group, override.value())
            except ConfigError as bad:
                raise ConfigError(f"override {merging.group(1)}: {bad}") from None
            cause = str(e.__cause__ or e).splitlines()[0]
            raise ConfigError(f"override {merging.group(1)}: {cause}") from None
        unknown = re.match(r"Could not override '([^']+)'", message)
        parent = unknown.group(1).rpartition(".")[0] if unknown else ""
        keys = config.schema_keys()
        if unknown and parent in keys and not any(k.startswith(parent + ".") for k in keys):
            # A new entry of a mapping setting (serving.slo, hardware.peak_tflops): Hydra needs the `+`.
            raise ConfigError(f"override: {unknown.group(1)} adds an entry to the mapping {parent}; write "
                              f"+{unknown.group(1)}=<value> (and ~{parent}.<key> to remove one)") from None
        if unknown and unknown.group(1) not in config.schema_keys():
            # Hydra would advise adding the key with `+`; a mistyped key needs the closest valid one instead.
            given = next((f"override {o}" for o in overrides if o.split("=", 1)[0] == unknown.group(1)), "override")
            raise ConfigError(f"{given}: {config.unknown_key_message(unknown.group(1))}") from None
        raise ConfigError(f"conf/: {message}") from None


def _missing_option(e: MissingConfigException, conf_dir: Path, overrides: Sequence[str]) -> str:
    """`model=tinyy`: the option's group, the closest option and all of them, in one line."""
    group, _, option = (e.missing_cfg_file or "").rpartition("/")
    options = list(e.options or ())
    given = next((o for o in overrides if o.lstrip("+").split("=", 1)[0] == group), None)
    where = f"override {given}" if given else f"{conf_dir / 'config.yaml'} (defaults: {group}: {option})"
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{where}: {conf_dir.name}/{group}/ has no option '{option}'{hint} (options: {', '.join(options)})"


def _undecodable(conf_dir: Path) -> str:
    for path in sorted(conf_dir.rglob("*.yaml")):
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            return f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8"
    return f"{conf_dir}: a file is not UTF-8 text; save it as UTF-8"


def compose_params(conf_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    raw = compose_dict(conf_dir, overrides)
    try:
        config.from_dict(raw, source="conf/ (composed)")
    except ConfigError as e:
        unknown = re.search(r"unknown key '([^']+)'.*", str(e))
        where = unknown and _where_set(Path(conf_dir), overrides, unknown.group(1))
        if where:  # the composed config has lost where a key came from: name the override or file that sets it
            raise ConfigError(f"{where}: {unknown.group(0)}") from None
        raise
    return raw


def _where_set(conf_dir: Path, overrides: Sequence[str], dotted: str) -> str:
    """The override, or the conf/ files, that set `dotted` ('' if none is found)."""
    given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == dotted]
    if given:
        return f"override {given[0]}"
    group, _, rest = dotted.partition(".")
    candidates = [(conf_dir / "config.yaml", dotted)] + [(p, rest) for p in sorted((conf_dir / group).rglob("*.yaml"))]
    files = []
    for path, key in candidates:
        node = config.read_yaml(path)
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            files.append(str(path))
    return ", ".join(files)


def write_params(raw: dict[str, Any], path: Path) -> None:
    text = PARAMS_HEADER + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)
    atomic_write_text(Path(path), text)

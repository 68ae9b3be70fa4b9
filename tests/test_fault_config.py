"""Fault class 3 (issue 19): a bad config is rejected when it is composed or loaded, in one line naming the dotted
key (or the file, line and column of a YAML error), from every entry point, never as a traceback.

The bad-value cases are generated from the schema (pipeline/config.py's dataclasses and their type hints), so a
key added later is covered without editing this file."""

from __future__ import annotations

import copy
import math
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline import config
from pipeline.compose import compose_dict, compose_params
from pipeline.errors import ConfigError
from tests.conftest import ROOT
from tests.helpers import project_env

CONF = ROOT / "conf"
# The base every bad value is planted in: hardware=h100 fills hardware.peak_tflops and the bandwidth, so the
# entries of every mapping setting (serving.slo, tensorrt.profiles, hardware.peak_tflops) exist to be spoiled.
BASE_OVERRIDES = ["hardware=h100"]

REJECT, EITHER = "reject", "either"  # EITHER: accepted, or rejected naming the key; never another exception


def _scalar_cases(hint, key: str) -> list[tuple[str, object, str]]:
    """(kind, bad value, expectation) for one scalar setting of type `hint`."""
    wrong = [("list", [1], REJECT), ("dict", {"a": 1}, REJECT)]
    if hint is bool:
        return wrong + [("string", "abc", REJECT), ("int", 1, REJECT), ("zero", 0, REJECT), ("huge", 10**30, REJECT)]
    if hint is str:
        return wrong + [("number", 5, REJECT), ("bool", True, REJECT), ("nan", math.nan, REJECT)]
    if hint in (int, float):
        # No setting of this pipeline is negative (counts, sizes, rates, seeds, fractions, tolerances): a key that
        # admits negatives must be listed in the test with why.
        inf = EITHER if config.allows_inf(key) else REJECT
        cases = wrong + [("nan", math.nan, REJECT), ("inf", math.inf, inf), ("-inf", -math.inf, REJECT),
                         ("negative", -1, REJECT), ("zero", 0, EITHER), ("string", "abc", REJECT),
                         ("bool", True, REJECT)]
        # An int past 64 bits overflows torch and numpy; a float has no such limit of its own, but a timeout
        # past threading.TIMEOUT_MAX overflows socket and thread waits.
        huge_float = REJECT if key.endswith("timeout_s") else EITHER
        cases.append(("huge", 2**63, REJECT) if hint is int else ("huge", 1e300, huge_float))
        if hint is int:
            cases.append(("fraction", 2.5, REJECT))
        return cases
    raise AssertionError(f"{key}: no cases for type {hint}; extend _scalar_cases")


def _cases(hint, key: str, value) -> list[tuple[str, str, object, str]]:
    """(dotted key, kind, bad value, expectation) for `key` of type `hint` whose value in the base is `value`;
    nested values (list items, mapping entries) get the scalar cases of their own type."""
    cases = []
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    else:
        cases.append((key, "null", None, REJECT))
    origin = typing.get_origin(hint)
    if dataclasses_is(hint):
        for name, sub in typing.get_type_hints(hint).items():
            cases += _cases(sub, f"{key}.{name}", (value or {}).get(name))
    elif origin is list:
        cases += [(key, "dict", {"a": 1}, REJECT), (key, "scalar", 1, REJECT)]
        item = typing.get_args(hint)[0]
        cases += [(f"{key}[0]", kind, bad, expect) for k, kind, bad, expect
                  in _cases(item, f"{key}[0]", (value or [None])[0])]
    elif origin is dict:
        cases += [(key, "list", [1], REJECT), (key, "scalar", 1, REJECT)]
        if value:  # an entry to spoil (BASE_OVERRIDES makes sure every mapping has one)
            entry = next(iter(value))
            cases += [(f"{key}.{entry}", kind, bad, expect) for k, kind, bad, expect
                      in _cases(typing.get_args(hint)[1], f"{key}.{entry}", value[entry])]
    else:
        cases += [(key, kind, bad, expect) for kind, bad, expect in _scalar_cases(hint, key)]
    return cases


def dataclasses_is(hint) -> bool:
    import dataclasses

    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _all_cases() -> list[tuple[str, str, object, str]]:
    base = compose_dict(CONF, BASE_OVERRIDES)
    cases = []
    for name, hint in typing.get_type_hints(config.PipelineConfig).items():
        cases += [c for c in _cases(hint, name, base.get(name)) if c[0] != name]  # not whole sections
    return cases


CASES = _all_cases()


def _plant(raw: dict, dotted: str, value) -> dict:
    """Set `dotted` (with [i] list items) in raw; an absent parent (a null Optional section) becomes a mapping."""
    parts = dotted.replace("[", ".[").split(".")
    node = raw
    for part, nxt in zip(parts, parts[1:]):
        index = int(part[1:-1]) if part.startswith("[") else part
        if isinstance(index, int):
            while len(node) <= index:
                node.append(None)
        child = node[index] if isinstance(index, int) else node.get(index)
        if child is None or not isinstance(child, (dict, list)):
            child = [] if nxt.startswith("[") else {}
            node[index] = child
        node = child
    last = parts[-1]
    if last.startswith("["):
        index = int(last[1:-1])
        while len(node) <= index:
            node.append(None)
        node[index] = value
    else:
        node[last] = value
    return raw


@pytest.fixture(scope="module")
def base_raw() -> dict:
    return compose_dict(CONF, BASE_OVERRIDES)


def test_the_cases_cover_every_leaf_of_the_schema():
    keys = set(config.schema_keys())
    leaves = {k for k in keys if not any(o.startswith(k + ".") for o in keys)}
    covered = {c[0].split("[")[0] for c in CASES}
    covered |= {k.rsplit(".", 1)[0] for k in covered if k.rsplit(".", 1)[0] in keys}  # mapping entries
    assert leaves <= covered, sorted(leaves - covered)
    assert len(CASES) > 5 * len(leaves)


@pytest.mark.parametrize("key,kind,value,expect", CASES, ids=[f"{k}={kind}" for k, kind, _, _ in CASES])
def test_every_setting_rejects_bad_values_in_one_line_naming_it(base_raw, key, kind, value, expect):
    raw = _plant(copy.deepcopy(base_raw), key, value)
    try:
        config.from_dict(raw)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and key.split("[")[0] in message, message
        return
    assert expect == EITHER, f"{key}={value!r} ({kind}) was accepted"


def test_inf_is_allowed_only_where_it_means_something():
    # serving.request_rates: inf = every request at once (vLLM's --request-rate inf).
    assert [k for k in config.schema_keys() if config.allows_inf(k)] == ["serving.request_rates"]


# -- cross-field checks --------------------------------------------------------------------------------------------

def test_odd_head_dim_is_rejected(base_raw):
    # RoPE rotates pairs of dimensions: Hugging Face refuses an odd head_dim when the model is built.
    raw = _plant(_plant(copy.deepcopy(base_raw), "model.hidden_size", 72), "model.num_heads", 8)
    with pytest.raises(ConfigError, match=r"model.num_heads .*head dimension 9.*must be even"):
        config.from_dict(raw)


# -- YAML syntax errors: file, line and column, from every entry point ---------------------------------------------

BROKEN_YAML = {  # text -> (line, column) of the error as a user counts them (1-based)
    "model:\n  name: tiny\n  source: [preset\n": (4, 1),
    "model:\n  name: tiny\n\tseed: 1\n": (3, 1),
    "model:\n  name: tiny\n  name: small\n": (3, 3),  # a duplicate key would silently win
}


@pytest.mark.parametrize("text", BROKEN_YAML, ids=["unclosed", "tab", "duplicate"])
def test_load_reports_yaml_errors_with_file_line_and_column(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    line, column = BROKEN_YAML[text]
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:{column}: ") and "\n" not in message, message


def _conf_copy(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    return conf


def test_compose_reports_a_broken_group_file_with_file_line_and_column(tmp_path):
    conf = _conf_copy(tmp_path)
    (conf / "model" / "mine.yaml").write_text("name: mine\nsource: [preset\nseed: 1\n")
    with pytest.raises(ConfigError) as info:
        compose_params(conf, ["model=mine"])
    message = str(info.value)
    assert f"{conf / 'model' / 'mine.yaml'}:3:5: " in message and "\n" not in message, message


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = project_env(PYTHONPATH=str(ROOT), COLUMNS="400")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


def test_compose_cli_reports_broken_conf_files_and_params_in_one_line(tmp_path):
    conf = _conf_copy(tmp_path)
    with open(conf / "benchmark" / "default.yaml", "a") as f:
        f.write("\tmeasured_runs: 3\n")
    line = len((conf / "benchmark" / "default.yaml").read_text().splitlines())
    out = _one_error_line(_cli(["compose", "--conf", str(conf)], tmp_path))
    assert f"default.yaml:{line}:1: " in out, out
    shutil.copy(CONF / "benchmark" / "default.yaml", conf / "benchmark" / "default.yaml")
    (conf / "config.yaml").write_text((CONF / "config.yaml").read_text() + "  bad: : x\n")
    assert "config.yaml:" in _one_error_line(_cli(["compose", "--conf", str(conf)], tmp_path))
    # --check reads the params.yaml it compares against
    shutil.copy(CONF / "config.yaml", conf / "config.yaml")
    (tmp_path / "params.yaml").write_text("model: {name: x\n")
    assert "params.yaml:2:1: " in _one_error_line(_cli(["compose", "--conf", str(conf), "--check"], tmp_path))
    assert "params.yaml:2:1: " in _one_error_line(_cli(["validate"], tmp_path))


def test_every_stage_reports_a_broken_params_yaml_in_one_line(tmp_path):
    """Each stage's entry point, in one process (the imports are paid once), in a directory whose params.yaml
    does not parse: each must end with the one error line, exit 1, before writing anything."""
    stages = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))
    (tmp_path / "params.yaml").write_text("model:\n  name: tiny\n  source: [preset\n")
    script = (  # markers on stderr, where the stages' console writes
        "import importlib, sys\n"
        "from stages._main import run\n"
        f"for name in {stages!r}:\n"
        "    print('@@', name, file=sys.stderr, flush=True)\n"
        "    try:\n"
        "        run(importlib.import_module('stages.' + name).main)\n"
        "    except SystemExit as e:\n"
        "        print('@@exit', e.code, file=sys.stderr, flush=True)\n"
    )
    env = project_env(PYTHONPATH=str(ROOT), COLUMNS="400")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    blocks = proc.stdout.split("@@ ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == stages
    for block in blocks:
        name, *lines = block.strip().splitlines()
        assert lines[-1] == "@@exit 1" and len(lines) == 2 and "params.yaml:4:1: " in lines[0], block
    assert not {"artifacts", "metrics", "plots", "reports"} & {p.name for p in tmp_path.iterdir()}  # no output


# -- Hydra overrides -----------------------------------------------------------------------------------------------

def test_unknown_group_option_gets_did_you_mean_and_the_choices():
    with pytest.raises(ConfigError) as info:
        compose_params(CONF, ["model=tinyy"])
    message = str(info.value)
    assert "model=tinyy" in message and "did you mean 'tiny'?" in message and "llama3-8b" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("override,expected", [
    ("benchmark.measured_runs=abc", "benchmark.measured_runs has the wrong type: must be an integer, got 'abc'"),
    ("benchmark.prompt_lengths={a: 1}", "benchmark.prompt_lengths has the wrong type: must be a list"),
    ("benchmark.backends=torch", "benchmark.backends has the wrong type: must be a list"),
    ("benchmark.backends=[torch", "override benchmark.backends=[torch: no viable alternative at input '[torch'"),
    ("model/foo=x", "override model/foo=x"),
    ("tracking.enabled=2", "tracking.enabled has the wrong type: must be true or false, got 2"),
    ("+model.revision=1234567", "model.revision has the wrong type: must be a string"),
])
def test_override_errors_are_one_line_naming_the_override_or_key(override, expected):
    with pytest.raises(ConfigError) as info:
        compose_params(CONF, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message and "See https" not in message, message


def test_unknown_key_in_a_group_file_names_the_file_and_the_closest_key(tmp_path):
    conf = _conf_copy(tmp_path)
    group_file = conf / "benchmark" / "default.yaml"
    group_file.write_text(group_file.read_text().replace("batch_sizes:", "batch_size:"))
    with pytest.raises(ConfigError) as info:
        compose_params(conf)
    message = str(info.value)
    assert message.startswith(f"{group_file}: unknown key 'benchmark.batch_size'; did you mean "
                              f"'benchmark.batch_sizes'?"), message
    with pytest.raises(ConfigError, match=r"^override \+benchmark.warmup=1: unknown key 'benchmark.warmup'; did you "
                                          r"mean 'benchmark.warmup_runs'\?"):
        compose_params(CONF, ["+benchmark.warmup=1"])


def test_advise_reports_a_broken_params_yaml_in_one_line(tmp_path):
    # advise reads hardware.price_per_hour from the workspace's params.yaml next to its serving results
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "serving.json").write_text('{"points": []}')
    (tmp_path / "params.yaml").write_text("hardware: {price_per_hour: 2\n")
    out = _one_error_line(_cli(["advise", "--ttft-p99-ms", "100"], tmp_path))
    assert "params.yaml:2:1: not valid YAML" in out, out

"""The typed schema: every conf/ combination composes and validates; bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.compose import compose_dict, compose_params
from pipeline.errors import ConfigError
from tests.conftest import ROOT

CONF = ROOT / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_params_yaml_is_up_to_date_with_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose_dict(CONF), "params.yaml is stale: run `python -m pipeline compose` and commit it"


def test_params_yaml_validates():
    cfg = config.load(ROOT / "params.yaml")
    assert cfg.model.name == "tiny" and cfg.model.num_kv_heads < cfg.model.num_heads


@pytest.mark.parametrize("model", _options("model"))
def test_every_option_composes_with_every_model(model):
    # Each option of every other group, combined with this model (the groups do not interact beyond
    # the cross-checks exercised below, so the full product would only repeat these).
    extra = ["model.local_dir=/models/any"] if model == "local" else []
    for group in ("precision", "parallel", "benchmark", "hardware", "tracking"):
        for option in _options(group):
            overrides = [f"model={model}", f"{group}={option}", *extra]
            if model == "tiny" and (group, option) == ("benchmark", "gpu"):
                # 2048-token prompts exceed the tiny model's 512 positions: the schema must say so.
                with pytest.raises(ConfigError, match="benchmark.prompt_lengths"):
                    compose_params(CONF, overrides)
                continue
            cfg = config.from_dict(compose_params(CONF, overrides))
            assert cfg.model.name == model and cfg.parallel.world_size == cfg.parallel.tp * cfg.parallel.pp


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def _delete(raw: dict, dotted: str) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    return raw


BAD_VALUES = [
    # (dotted key, bad value, text the message must contain besides the key)
    ("benchmark.batch_sizes", [0], "must be >= 1"),
    ("benchmark.batch_sizes", [], "must not be empty"),
    ("benchmark.prompt_lengths", [-4], "must be >= 1"),
    ("benchmark.output_length", 1, "must be >= 2"),
    ("benchmark.measured_runs", 0, "must be >= 1"),
    ("benchmark.warmup_runs", -1, "must be >= 0"),
    ("benchmark.backends", ["tensorflow"], "must be one of"),
    ("benchmark.backends", ["torch", "torch"], "twice"),
    ("benchmark.output_length", "many", "wrong type"),
    ("precision.name", "int4", "must be one of fp32, fp16, bf16"),
    ("parallel.tp", 3, "must divide model.num_heads=8"),
    ("parallel.tp", 0, "must be >= 1"),
    ("parallel.pp", 3, "must divide model.num_layers=4"),
    ("parallel.pp", "two", "wrong type"),
    ("hardware.device", "tpu", "must be one of cpu, cuda"),
    ("hardware.num_threads", -2, "must be >= 0"),
    ("model.source", "s3", "must be one of preset, local, hub"),
    ("model.dtype", "float8", "must be one of"),
    ("model.num_kv_heads", 3, "must divide model.num_heads"),
    ("model.num_heads", 7, "must divide model.hidden_size"),
    ("model.hidden_size", 0, "must be >= 1"),
    ("model.eos_token_id", 9999, "must be in [0, model.vocab_size=512)"),
    ("model.rope_scaling.factor", 0.0, "must be > 0"),
    ("model.rope_scaling.rope_type", "yarn", "must be one of llama3"),
    ("model.rope_theta", -1.0, "must be > 0"),
    ("tracking.experiment", "", "non-empty"),
    ("tracking.timeout_s", 0.0, "must be > 0"),
    ("tracking.enabled", "sometimes", "wrong type"),
    ("convert.formats", ["onnx"], "must be one of ft, trtllm"),
    ("model.train_steps", -1, "must be >= 0"),
    ("export.opset", 13, "must be >= 18"),
    ("export.ort_optimization", "max", "must be one of basic, extended, all"),
    ("calibration.method", "kl", "must be one of minmax, entropy, percentile"),
    ("calibration.num_samples", 0, "must be >= 1"),
    ("calibration.seq_len", 600, "exceeds model.max_position_embeddings=512"),
    ("calibration.op_types", ["MatMull"], "must be one of"),
    ("calibration.op_types", [], "at least one op type"),
    ("calibration.percentile", 101.0, "must be in (0, 100]"),
    ("calibration.smoothquant_alpha", 2.0, "must be in [0, 1]"),
    ("evaluate.torch_precisions", ["fp16"], "must include fp32"),
    ("evaluate.gate.mode", "maybe", "must be one of off, warn, fail"),
    ("evaluate.gate.min_top1", -0.1, "must be in [0, 1]"),
    ("evaluate.seq_len", 1, "must be >= 2"),
    ("convert.dtype", "int8", "must be one of fp32, fp16, bf16"),
    ("convert.ft_int8_mode", 2, "must be one of 0, 1"),
    ("convert.trtllm_quant", "W4A16", "must be one of W8A16"),
    ("verify.max_new_tokens", 0, "must be >= 1"),
    ("verify.min_top1", 1.5, "must be in [0, 1]"),
    ("verify.on_fail", "ignore", "must be one of error, warn"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_the_key(raw, key, value, expected):
    with pytest.raises(ConfigError) as info:
        config.from_dict(_set(raw, key, value))
    message = str(info.value)
    assert key in message and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("key,closest", [("benchmark.batch_size", "benchmark.batch_sizes"),
                                         ("model.rope_scaling.factr", "model.rope_scaling.factor"),
                                         ("tracking.url", "tracking.uri"), ("precison", "precision")])
def test_unknown_key_gets_the_closest_valid_key(raw, key, closest):
    with pytest.raises(ConfigError) as info:
        config.from_dict(_set(raw, key, 1) if "." in key else {**raw, key: 1})
    assert str(info.value).endswith(f"unknown key '{key}'; did you mean '{closest}'?"), info.value


@pytest.mark.parametrize("key", ["extra", "benchmark.zzz_qqq", "parallel.dp"])
def test_unknown_key_without_a_close_one_lists_the_allowed_ones(raw, key):
    with pytest.raises(ConfigError) as info:
        config.from_dict(_set(raw, key, 1) if "." in key else {**raw, key: 1})
    message = str(info.value)
    assert f"unknown key '{key}'" in message and "allowed" in message, message


@pytest.mark.parametrize("override,closest", [("benchmark.batch_size=[1]", "benchmark.batch_sizes"),
                                              ("precison=bf16", "precision"), ("parallel.ppp=2", "parallel.pp"),
                                              ("benchmrk.seed=1", "benchmark")])
def test_mistyped_override_gets_did_you_mean_not_hydras_plus_advice(override, closest):
    with pytest.raises(ConfigError) as info:
        compose_params(CONF, [override])
    message = str(info.value)
    assert f"did you mean '{closest}'?" in message and "+" not in message and "\n" not in message, message


def test_tp_above_kv_heads_only_without_fastertransformer(raw):
    # 8 query heads, 2 KV heads: tp=4 replicates each KV head on two ranks (as TensorRT-LLM does);
    # FasterTransformer cannot, so it must be left out of convert.formats.
    _set(raw, "parallel.tp", 4)
    with pytest.raises(ConfigError, match=r"parallel.tp must divide model.num_kv_heads=2 for FasterTransformer .*got 4.*"
                                          r"drop that format from convert.formats"):
        config.from_dict(raw)
    assert config.from_dict(_set(raw, "convert.formats", ["trtllm"])).parallel.tp == 4


def test_tp_that_divides_neither_head_count_fails(raw):
    _set(raw, "model.num_heads", 12)
    _set(raw, "model.hidden_size", 96)
    _set(raw, "model.num_kv_heads", 4)
    _set(raw, "convert.formats", ["trtllm"])  # TensorRT-LLM replicates KV heads, but only a whole number of times
    with pytest.raises(ConfigError, match=r"parallel.tp must divide model.num_kv_heads=4 or be a multiple of it; got 6"):
        config.from_dict(_set(raw, "parallel.tp", 6))


def test_preset_needs_its_shape(raw):
    with pytest.raises(ConfigError, match="model.vocab_size is required when model.source=preset"):
        config.from_dict(_set(raw, "model.vocab_size", None))


def test_hub_source_needs_a_repo_id(raw):
    _set(raw, "model.source", "hub")
    _set(raw, "model.tokenizer", "source")
    _set(raw, "model.train_steps", 0)
    with pytest.raises(ConfigError, match="model.hub_id is required"):
        config.from_dict(raw)


def test_prompt_plus_output_longer_than_positions(raw):
    with pytest.raises(ConfigError, match="benchmark.prompt_lengths.*model.max_position_embeddings=512"):
        config.from_dict(_set(raw, "benchmark.prompt_lengths", [500]))


def test_missing_section_takes_schema_defaults_but_missing_mandatory_value_fails():
    with pytest.raises(ConfigError, match="model.local_dir"):
        compose_params(CONF, ["model=local"])


def test_hydra_errors_are_one_line():
    with pytest.raises(ConfigError) as info:
        compose_params(CONF, ["precision=int4"])
    assert "precision" in str(info.value) and "bf16, fp16, fp32" in str(info.value)
    assert "\n" not in str(info.value) and "search path" not in str(info.value)
    with pytest.raises(ConfigError, match="benchmark.foo"):
        compose_params(CONF, ["+benchmark.foo=1"])


def test_load_reports_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="params.yaml: not found; run `python -m pipeline compose`"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(tmp_path / "params.yaml")


def test_compose_cli_check_detects_stale_params(tmp_path: Path):
    from pipeline.__main__ import main

    out = tmp_path / "params.yaml"
    assert main(["compose", "--conf", str(CONF), "--output", str(out)]) == 0
    assert main(["compose", "--conf", str(CONF), "--output", str(out), "--check"]) == 0
    assert main(["compose", "precision=bf16", "--conf", str(CONF), "--output", str(out), "--check"]) == 1
    assert main(["compose", "parallel.tp=3", "--conf", str(CONF), "--output", str(out)]) == 1
    assert yaml.safe_load(out.read_text())["parallel"]["tp"] == 1  # a rejected config is never written


def test_flatten():
    assert config.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_precision_no_listed_backend_can_run_is_rejected_at_compose_time():
    with pytest.raises(ConfigError) as info:
        compose_params(CONF, ["precision=int8", "benchmark.backends=[torch]"])
    message = str(info.value)
    assert "benchmark.backends=['torch']: none can run precision.name=int8" in message
    assert "backends that can: onnxruntime" in message and "\n" not in message


def test_backend_whose_artifact_is_not_converted_is_rejected():
    with pytest.raises(ConfigError, match=r"benchmark.backends\[3\]=torch-tp loads artifacts/trtllm .*add trtllm to "
                                          r"convert.formats or drop torch-tp"):
        compose_params(CONF, ["convert.formats=[ft]"])
    assert compose_params(CONF, ["convert.formats=[ft]", "benchmark.backends=[torch]"])


def test_local_weights_are_copied_as_stored_and_preset_needs_a_dtype(raw):
    local = compose_params(CONF, ["model=local", "model.local_dir=/models/x"])
    assert local["model"]["dtype"] is None
    with pytest.raises(ConfigError, match="model.dtype is required when model.source=preset"):
        config.from_dict(_set(raw, "model.dtype", None))


def test_calibration_methods_share_one_base():
    composed = {m: compose_dict(CONF, [f"calibration={m}"])["calibration"] for m in ("minmax", "entropy", "percentile")}
    assert {c.pop("method") for c in composed.values()} == {"minmax", "entropy", "percentile"}
    assert composed["minmax"] == composed["entropy"] == composed["percentile"]
    for m in composed:
        assert "method:" in (CONF / "calibration" / f"{m}.yaml").read_text()
        assert "num_samples" not in (CONF / "calibration" / f"{m}.yaml").read_text()


def test_tolerances_default_from_the_precision_table(default_cfg):
    from pipeline.precision import PRECISIONS

    assert default_cfg.export.parity_atol is None and default_cfg.export.atol == PRECISIONS["fp32"].logits_atol
    assert default_cfg.verify.atol("fp32") == PRECISIONS["fp32"].logits_atol
    assert default_cfg.verify.atol("bf16") is None  # lower precisions: top-1 gate only

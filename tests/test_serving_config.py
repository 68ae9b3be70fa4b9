"""Bad serving input fails before anything runs, in one line naming the setting or the file: the `serving` section
of the config, a ShareGPT dataset file (workload.sharegpt_requests), a request longer than the model (check_fits)."""

from __future__ import annotations

import json
import math

import pytest

from pipeline import config
from pipeline.backends.requests import EngineLimits, Request, check_fits
from pipeline.benchmark.workload import sharegpt_requests
from pipeline.errors import ConfigError, PipelineError
from tests.test_config import _set


def _rejects(raw: dict, *expected: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    message = str(info.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


@pytest.mark.parametrize("rates,index,shown", [([4.0, 0.0], 1, "must be > 0"), ([-2.0], 0, "must be > 0"),
                                               ([1.0, 2.0, math.nan], 2, "must be a number, got nan")])
def test_request_rate_must_be_positive(raw, rates, index, shown):
    _rejects(_set(raw, "serving.request_rates", rates), f"serving.request_rates[{index}] {shown}")


def test_infinite_request_rate_is_accepted(raw):
    cfg = config.from_dict(_set(raw, "serving.request_rates", [2.0, math.inf]))
    assert cfg.serving.request_rates == [2.0, math.inf]


@pytest.mark.parametrize("name", ["ttft_p99", "itl_ms"])
def test_slo_on_an_unknown_metric(raw, name):
    _rejects(_set(raw, "serving.slo", {name: 100.0}), f"serving.slo.{name} is not a metric an SLO can bound",
             "ttft_ms, tpot_ms, e2el_ms")


def test_slo_bound_must_be_finite(raw):
    _rejects(_set(raw, "serving.slo", {"ttft_ms": math.inf}), "serving.slo.ttft_ms must be finite, got inf")


def test_zero_concurrency(raw):
    _rejects(_set(raw, "serving.concurrencies", [4, 0]), "serving.concurrencies[1] must be >= 1, got 0")


def test_no_load_point_at_all(raw):
    _set(raw, "serving.request_rates", [])
    _rejects(_set(raw, "serving.concurrencies", []), "serving.request_rates and serving.concurrencies are both empty")


def test_sharegpt_needs_a_dataset_path(raw):
    _rejects(_set(raw, "serving.dataset", "sharegpt"), "serving.dataset_path is required when serving.dataset=sharegpt")


@pytest.mark.parametrize("key,closest", [("serving.request_rate", "serving.request_rates"),
                                         ("serving.max_num_seq", "serving.max_num_seqs")])
def test_mistyped_serving_key_gets_did_you_mean(raw, key, closest):
    message = _rejects(_set(raw, key, 1))
    assert message.endswith(f"unknown key '{key}'; did you mean '{closest}'?"), message


def test_unknown_serving_key_without_a_close_one_lists_the_allowed_ones(raw):
    _rejects(_set(raw, "serving.rate", 3), "unknown key 'serving.rate'", "allowed under 'serving'", "request_rates")


def test_tensor_parallel_backend_cannot_serve(raw):
    _rejects(_set(raw, "serving.backends", ["torch", "torch-tp"]), "serving.backends[1]",
             "backend torch-tp has no request-level engine")


def test_requests_longer_than_the_model(raw):
    # The default tiny model has 512 positions; 500 + 16 tokens (x 1.25 with range_ratio 0.25) exceed them.
    _set(raw, "serving.range_ratio", 0.0)
    _set(raw, "serving.output_len", 16)
    _rejects(_set(raw, "serving.input_len", 500), "serving.input_len plus serving.output_len",
             "model.max_position_embeddings=512")
    assert config.from_dict(_set(raw, "serving.input_len", 496)).serving.longest_request == 512


def test_hardware_price_must_be_positive(raw):
    _rejects(_set(raw, "hardware.price_per_hour", 0.0), "hardware.price_per_hour must be > 0 or null")
    assert config.from_dict(_set(raw, "hardware.price_per_hour", 2.5)).hardware.price_per_hour == 2.5


# -- ShareGPT files ---------------------------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    return [ord(c) % 50 + 2 for c in text]


def _conversation(*turns: str) -> dict:
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


@pytest.mark.parametrize("content,expected", [
    (None, "file not found"),
    ("", "not valid JSON"),
    ("[]", "no conversation with two turns"),
    ('[{"conversations": [', "not valid JSON"),
    ('{"conversations": []}', "expected a JSON list of conversations"),
    ('[{"id": "a", "turns": []}]', 'entry 0 has no "conversations" list'),
    (json.dumps([_conversation("hi", "there"), {"conversations": [{"from": "human"}, {"value": 3}]}]),
     'entry 1: a turn lacks a string "value"'),
], ids=["missing", "empty-file", "empty-list", "malformed", "not-a-list", "no-conversations", "turn-without-value"])
def test_bad_sharegpt_file_is_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "sharegpt.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PipelineError) as info:
        sharegpt_requests(path, 4, encode, None, seed=0)
    message = str(info.value)
    assert f"serving.dataset_path={path}" in message and expected in message, message
    assert "\n" not in message


@pytest.fixture
def sharegpt_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        _conversation("What is a llama?", "A South American camelid.", "Thanks"),
        _conversation("only one turn"),   # skipped: no reply
        _conversation("Hi", "Hello there!"),
    ]), encoding="utf-8")
    return path


def test_sharegpt_prompt_is_the_first_turn_and_output_length_the_reply(sharegpt_file):
    requests = sharegpt_requests(sharegpt_file, 2, encode, None, seed=0)
    assert [r.id for r in requests] == [0, 1]
    assert {(r.prompt, r.max_new_tokens) for r in requests} == {
        (tuple(encode("What is a llama?")), len("A South American camelid.")),
        (tuple(encode("Hi")), len("Hello there!")),
    }


def test_sharegpt_repeats_conversations_and_output_len_overrides(sharegpt_file):
    requests = sharegpt_requests(sharegpt_file, 5, encode, 7, seed=1)
    assert len(requests) == 5 and [r.id for r in requests] == list(range(5))
    assert {r.prompt for r in requests} <= {tuple(encode("What is a llama?")), tuple(encode("Hi"))}
    assert all(r.max_new_tokens == 7 for r in requests)
    assert requests == sharegpt_requests(sharegpt_file, 5, encode, 7, seed=1)  # seeded


# -- check_fits -------------------------------------------------------------------------------------------------

LIMITS = EngineLimits(max_num_seqs=4, max_seq_len=64, max_num_batched_tokens=32)


def test_request_longer_than_the_context_names_it_and_what_to_shorten():
    with pytest.raises(PipelineError) as info:
        check_fits(Request(7, tuple(range(2, 22)), 50), LIMITS, context=64)
    message = str(info.value)
    assert message.startswith("request 7: 20 prompt + 50 output tokens exceed the model's context of 64")
    assert "serving.input_len" in message and "serving.output_len" in message and "\n" not in message


def test_prompt_over_the_prefill_token_budget():
    with pytest.raises(PipelineError, match=r"request 3: its 40-token prompt exceeds serving.max_num_batched_tokens=32"):
        check_fits(Request(3, (5,) * 40, 4), LIMITS, context=64)


def test_request_filling_the_context_exactly_fits():
    check_fits(Request(0, (5,) * 32, 32), LIMITS, context=64)

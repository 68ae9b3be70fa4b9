"""The serving benchmark's requests and when they arrive (vLLM `bench serve`'s load model).

Requests: random token ids of fixed lengths or lengths drawn uniformly around them (vLLM's --random-range-ratio),
or the first human turn of each conversation of a local ShareGPT-format JSON file (no hub access), its reply's
token count as the output length. Every backend of a run gets the same list (the stage builds it once).

Arrivals, one load point each: an open-loop Poisson process at `rate` requests/s (gamma-distributed gaps with
shape `burstiness`; 1 = Poisson), `rate` = inf for all at once (maximum throughput), or a closed loop of
`concurrency` clients, each sending its next request when its previous one finishes."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.backends.requests import Request
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class LoadPoint:
    kind: str      # "rate" (open loop) | "concurrency" (closed loop)
    value: float   # requests/s (inf: all at once) | clients

    @property
    def key(self) -> str:
        if self.kind == "rate":
            return "rate_inf" if math.isinf(self.value) else f"rate_{self.value:g}"
        return f"concurrency_{int(self.value)}"

    @property
    def label(self) -> str:
        if self.kind == "rate":
            return "max load (all at once)" if math.isinf(self.value) else f"{self.value:g} req/s"
        return f"{int(self.value)} concurrent"


def load_points(request_rates: list[float], concurrencies: list[int]) -> list[LoadPoint]:
    return [LoadPoint("rate", float(r)) for r in request_rates] + [LoadPoint("concurrency", c) for c in concurrencies]


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Open-loop send times (s from the start) of n requests: gaps ~ Gamma(shape=burstiness, mean=1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request starts the clock
    return np.cumsum(gaps).tolist()


def _lengths(mean: int, range_ratio: float, n: int, rng: random.Random) -> list[int]:
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> list[Request]:
    """n requests of random ids (no special tokens: ids 2..vocab-1), lengths fixed (range_ratio 0) or uniform in
    [len * (1 - r), len * (1 + r)]."""
    rng = random.Random(seed)
    ins = _lengths(input_len, range_ratio, n, rng)
    outs = _lengths(output_len, range_ratio, n, rng)
    return [Request(i, tuple(rng.randrange(2, vocab_size) for _ in range(a)), b)
            for i, (a, b) in enumerate(zip(ins, outs))]


def _conversations(path: Path) -> list[Any]:
    if not path.is_file():
        raise PipelineError(f"serving.dataset_path={path}: file not found; give a ShareGPT-format JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"serving.dataset_path={path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise PipelineError(f"serving.dataset_path={path}: expected a JSON list of conversations "
                            f"({{\"conversations\": [{{\"from\": ..., \"value\": ...}}, ...]}}), got {type(data).__name__}")
    return data


def sharegpt_requests(path: Path, n: int, encode: Callable[[str], list[int]], output_len: int | None,
                      seed: int) -> list[Request]:
    """n requests from a ShareGPT-format file: prompt = first turn, output length = the second turn's token count
    (or output_len when set); conversations with fewer than two turns are skipped, the rest sampled with `seed`
    (repeating when the file has fewer than n)."""
    usable = []
    for i, conv in enumerate(_conversations(path)):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise PipelineError(f"serving.dataset_path={path}: entry {i} has no \"conversations\" list (ShareGPT format)")
        if len(turns) < 2:
            continue
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            raise PipelineError(f"serving.dataset_path={path}: entry {i}: a turn lacks a string \"value\"")
        usable.append((turns[0]["value"], turns[1]["value"]))
    if not usable:
        raise PipelineError(f"serving.dataset_path={path}: no conversation with two turns; the file is empty or "
                            f"not ShareGPT format")
    rng = random.Random(seed)
    picks = [usable[rng.randrange(len(usable))] for _ in range(n)] if n > len(usable) else rng.sample(usable, n)
    out = []
    for i, (prompt, reply) in enumerate(picks):
        ids = encode(prompt)
        new = output_len or len(encode(reply))
        out.append(Request(i, tuple(ids) if ids else (2,), max(new, 1)))
    return out


def build_requests(serving, vocab_size: int, weights_dir: Path) -> tuple[list[Request], list[Request]]:
    """(requests of every load point, warm-up requests) for a ServingConfig; the warm-up ones repeat the
    first serving.warmup_requests requests (same shapes, so the engine warms up what it will run)."""
    if serving.dataset == "sharegpt":
        from pipeline.model.hf import load_tokenizer

        tokenizer = load_tokenizer(weights_dir)
        reqs = sharegpt_requests(Path(serving.dataset_path), serving.num_requests,
                                 lambda text: tokenizer.encode(text, add_special_tokens=False),
                                 serving.sharegpt_output_len, serving.seed)
    else:
        reqs = random_requests(serving.num_requests, serving.input_len, serving.output_len, serving.range_ratio,
                               vocab_size, serving.seed)
    warmup = [Request(i, r.prompt, r.max_new_tokens) for i, r in enumerate(reqs[:serving.warmup_requests])]
    return reqs, warmup

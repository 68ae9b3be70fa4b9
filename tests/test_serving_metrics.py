"""pipeline/benchmark/serving.py and workload.py: the serving metrics of a hand-made trace against hand-computed
numbers, the open-loop arrival process, and run_point's open and closed loops on a fake engine and a fake clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.backends.requests import Emitted, Request, RequestEngine
from pipeline.benchmark import serving
from pipeline.benchmark.serving import RequestRecord, per_request, run_point, serving_metrics
from pipeline.benchmark.workload import LoadPoint, arrival_times

# A trace of three completed requests and one that failed (1 of its 4 tokens came back). Times in seconds.
#   A: sent 0.0, tokens 0.10 0.12 0.18  -> TTFT 100, E2EL 180, TPOT (180-100)/2 = 40, ITL 20, 60
#   B: sent 0.2, tokens 0.50 0.55 0.75  -> TTFT 300, E2EL 550, TPOT (550-300)/2 = 125, ITL 50, 200
#   C: sent 0.3, token  0.35 (1 token)  -> TTFT 50,  E2EL 50,  no TPOT, no ITL
#   F: sent 0.1, token  0.90 of 4       -> failed: in no metric, and not in the duration
TRACE = [
    RequestRecord(0, prompt_len=10, output_len=3, send_s=0.0, token_s=[0.10, 0.12, 0.18]),
    RequestRecord(1, prompt_len=20, output_len=3, send_s=0.2, token_s=[0.50, 0.55, 0.75]),
    RequestRecord(2, prompt_len=6, output_len=1, send_s=0.3, token_s=[0.35]),
    RequestRecord(3, prompt_len=8, output_len=4, send_s=0.1, token_s=[0.90]),
]
SLO = {"ttft_ms": 200.0, "tpot_ms": 50.0}  # A passes (100, 40), B fails (TTFT 300), C passes (50, no TPOT)


@pytest.fixture(scope="module")
def metrics():
    return serving_metrics(TRACE, [50, 90, 99], SLO, slot_seconds=1.2, max_num_seqs=4)


def test_one_token_request_has_ttft_and_e2el_but_no_tpot():
    c = per_request(TRACE[2])
    assert c == pytest.approx({"ttft_ms": 50.0, "e2el_ms": 50.0})
    assert per_request(TRACE[0]) == pytest.approx({"ttft_ms": 100.0, "e2el_ms": 180.0, "tpot_ms": 40.0})


def test_counts_and_duration_leave_the_failed_request_out(metrics):
    assert metrics["completed"] == 3 and metrics["failed"] == 1
    # D = max last token (B: 0.75) - min send (A: 0.0); F's token at 0.90 would make it 0.9.
    assert metrics["duration_s"] == pytest.approx(0.75)
    assert metrics["total_input_tokens"] == 10 + 20 + 6
    assert metrics["total_output_tokens"] == 3 + 3 + 1  # the first token counts as output


def test_itl_pools_the_gaps_of_every_request(metrics):
    # ITL = [20, 60, 50, 200] -> sorted [20, 50, 60, 200]
    expected = {
        "itl_ms_mean": 82.5,      # 330 / 4
        "itl_ms_median": 55.0,    # (50 + 60) / 2
        "itl_ms_std": 69.4172,    # sqrt(((-62.5)^2 + (-32.5)^2 + (-22.5)^2 + 117.5^2) / 4) = sqrt(4818.75)
        "itl_ms_p50": 55.0,       # rank 0.5 * 3 = 1.5 -> 50 + 0.5 * (60 - 50)
        "itl_ms_p90": 158.0,      # rank 0.9 * 3 = 2.7 -> 60 + 0.7 * (200 - 60)
        "itl_ms_p99": 195.8,      # rank 0.99 * 3 = 2.97 -> 60 + 0.97 * 140
    }
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-3)


def test_ttft_tpot_e2el_statistics(metrics):
    expected = {
        # TTFT [100, 300, 50] -> sorted [50, 100, 300] (the 1-token request counts)
        "ttft_ms_mean": 150.0,
        "ttft_ms_median": 100.0,
        "ttft_ms_std": 108.0123,   # sqrt((50^2 + 150^2 + 100^2) / 3) = sqrt(11666.67)
        "ttft_ms_p50": 100.0,
        "ttft_ms_p90": 260.0,      # rank 0.9 * 2 = 1.8 -> 100 + 0.8 * 200
        "ttft_ms_p99": 296.0,      # rank 1.98 -> 100 + 0.98 * 200
        # TPOT [40, 125] (the 1-token request has none)
        "tpot_ms_mean": 82.5,
        "tpot_ms_median": 82.5,
        "tpot_ms_std": 42.5,
        "tpot_ms_p50": 82.5,
        "tpot_ms_p90": 116.5,      # rank 0.9 -> 40 + 0.9 * 85
        "tpot_ms_p99": 124.15,     # rank 0.99 -> 40 + 0.99 * 85
        # E2EL [180, 550, 50] -> sorted [50, 180, 550]
        "e2el_ms_mean": 260.0,
        "e2el_ms_median": 180.0,
        "e2el_ms_std": 211.8175,   # sqrt((80^2 + 290^2 + 210^2) / 3) = sqrt(44866.67)
        "e2el_ms_p90": 476.0,      # rank 1.8 -> 180 + 0.8 * 370
        "e2el_ms_p99": 542.6,      # rank 1.98 -> 180 + 0.98 * 370
    }
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-3)


def test_throughput_goodput_concurrency_and_slot_utilization(metrics):
    expected = {
        "request_throughput": 4.0,          # 3 / 0.75
        "output_token_throughput": 9.33,    # 7 / 0.75 = 9.333
        "total_token_throughput": 57.33,    # (7 + 36) / 0.75 = 57.333
        "goodput": 2.6667,                  # A and C meet the SLO: 2 / 0.75
        "goodput_fraction": 0.6667,         # 2 / 3
        "mean_concurrency": 1.04,           # (0.18 + 0.55 + 0.05) / 0.75
        "kv_slot_utilization": 0.4,         # 1.2 slot-seconds / (0.75 s * 4 slots)
    }
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-4)
    # A [0, 0.18] ends before B [0.2, 0.75] starts; C [0.3, 0.35] runs inside B.
    assert metrics["max_concurrency"] == 2


def test_no_slot_utilization_without_the_slot_integral():
    assert "kv_slot_utilization" not in serving_metrics(TRACE, [50], SLO)


def test_a_request_ending_when_another_starts_does_not_overlap_it():
    back_to_back = [RequestRecord(0, 1, 2, 0.0, [0.5, 1.0]), RequestRecord(1, 1, 2, 1.0, [1.5, 2.0])]
    assert serving_metrics(back_to_back, [50], {})["max_concurrency"] == 1


# -- arrival_times -------------------------------------------------------------------------------------------


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, math.inf, 1.0, seed=0) == [0.0] * 5


def test_poisson_arrivals_are_seeded_sorted_and_have_mean_gap_one_over_rate():
    times = arrival_times(20_000, 8.0, 1.0, seed=3)
    assert times == arrival_times(20_000, 8.0, 1.0, seed=3)
    assert times != arrival_times(20_000, 8.0, 1.0, seed=4)
    assert times[0] == 0.0 and len(times) == 20_000
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_is_the_gamma_shape_of_the_gaps(burstiness):
    gaps = np.diff(arrival_times(20_000, 5.0, burstiness, seed=1))
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)  # the rate does not change
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)  # CV 2 / 0.5


# -- run_point on a fake engine and a fake clock --------------------------------------------------------------

STEP_S = 0.01  # what one fake engine step takes on the fake clock


class FakeClock:
    def __init__(self, start: float = 0.0):
        self.t, self.reads = start, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads > 100_000:
            raise RuntimeError("run_point keeps reading the clock without progress")
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds


class FakeEngine(RequestEngine):
    """Every step takes STEP_S and emits one token for each request added so far; no slot limit."""

    def __init__(self, clock: FakeClock):
        self.clock, self.running, self.steps = clock, {}, 0
        self.added: dict[int, float] = {}   # request id -> clock when add_request ran
        self.peak_in_flight = 0

    def add_request(self, request: Request) -> None:
        self.added[request.id] = self.clock.t
        self.running[request.id] = [request.max_new_tokens, 0]
        self.peak_in_flight = max(self.peak_in_flight, len(self.running))

    def step(self, timeout_s=None) -> list[Emitted]:
        self.clock.t += STEP_S
        self.steps += 1
        out = []
        for rid, state in list(self.running.items()):
            state[1] += 1
            done = state[1] == state[0]
            out.append(Emitted(rid, 1000 + state[1], done))
            if done:
                del self.running[rid]
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    @property
    def slots_in_use(self) -> int:
        return len(self.running)


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(serving.time, "sleep", clock.sleep)
    return clock, FakeEngine(clock)


def _requests(lengths: list[int]) -> list[Request]:
    return [Request(i, (2, 3, 4), n) for i, n in enumerate(lengths)]


def test_open_loop_sends_at_the_scheduled_arrivals(fake):
    clock, engine = fake
    requests = _requests([3, 1, 4, 2, 3, 2])
    run = run_point(engine, requests, LoadPoint("rate", 10.0), burstiness=1.0, seed=5, clock=clock)
    scheduled = arrival_times(6, 10.0, 1.0, seed=5)
    assert [r.send_s for r in run.records] == scheduled
    for record, due in zip(run.records, scheduled):
        added = engine.added[record.id]
        # Added at its arrival, or at the end of the step running then (never before it, never later).
        assert due - 1e-9 <= added < due + STEP_S
        assert len(record.token_s) == record.output_len
        assert record.token_s[0] > record.send_s and record.token_s == sorted(record.token_s)
    assert run.steps == engine.steps
    # Each step holds its running requests for STEP_S and emits one token per request: slot-s = tokens * STEP_S.
    assert run.slot_seconds == pytest.approx(STEP_S * sum(r.max_new_tokens for r in requests))
    assert run.duration_s == pytest.approx(max(r.token_s[-1] for r in run.records))


def test_open_loop_at_infinite_rate_adds_everything_before_the_first_step(fake):
    clock, engine = fake
    run = run_point(engine, _requests([2, 3, 1]), LoadPoint("rate", math.inf), burstiness=1.0, seed=0, clock=clock)
    assert [r.send_s for r in run.records] == [0.0] * 3
    assert engine.peak_in_flight == 3
    expected = [[0.01, 0.02], [0.01, 0.02, 0.03], [0.01]]
    assert [r.token_s == pytest.approx(want) for r, want in zip(run.records, expected)] == [True] * 3
    assert run.steps == 3


def test_closed_loop_keeps_concurrency_requests_in_flight(fake):
    clock, engine = fake
    requests = _requests([3, 1, 2, 4, 2, 1])
    run = run_point(engine, requests, LoadPoint("concurrency", 2), burstiness=1.0, seed=0, clock=clock)
    records = {r.id: r for r in run.records}
    assert engine.peak_in_flight == 2
    assert records[0].send_s == records[1].send_s == 0.0
    ends = sorted(r.token_s[-1] for r in run.records)
    for rid in range(2, 6):
        # Sent when an earlier request's last token arrived, and added to the engine then.
        assert records[rid].send_s in {records[j].token_s[-1] for j in range(rid)}
        assert engine.added[rid] == pytest.approx(records[rid].send_s)
    # By hand (one token per request per 10 ms step): r1 ends at 10 ms -> r2 sent; r0 and r2 end at 30 ms ->
    # r3 and r4 sent; r4 ends at 50 ms -> r5 sent; r5 ends at 60, r3 at 70.
    assert [records[i].send_s for i in range(6)] == pytest.approx([0, 0, 0.01, 0.03, 0.03, 0.05])
    assert ends == pytest.approx([0.01, 0.03, 0.03, 0.05, 0.06, 0.07])
    assert serving_metrics(run.records, [50], {})["max_concurrency"] == 2


def test_token_times_are_the_engine_stamps_when_it_gives_them_and_step_gets_the_time_to_the_next_arrival():
    """An engine with threads of its own stamps each token when it arrived (Emitted.at, perf_counter): the
    record keeps that time, not when step() returned; and step() is told how long until the next request is due."""
    import time

    class Stamping(RequestEngine):
        def __init__(self):
            self.left, self.timeouts = {}, []

        def add_request(self, request):
            self.left[request.id] = request.max_new_tokens

        def step(self, timeout_s=None):
            self.timeouts.append(timeout_s)
            arrived = time.perf_counter()
            time.sleep(0.03)  # the driving loop takes the tokens 30 ms after they arrived
            out = []
            for rid in list(self.left):
                self.left[rid] -= 1
                out.append(Emitted(rid, 7, self.left[rid] == 0, at=arrived))
                if not self.left[rid]:
                    del self.left[rid]
            return out

        def has_unfinished_requests(self):
            return bool(self.left)

        @property
        def slots_in_use(self):
            return len(self.left)

    engine = Stamping()
    t0 = time.perf_counter()
    run = run_point(engine, [Request(0, (1,), 2), Request(1, (1,), 2)], LoadPoint("rate", 5.0), burstiness=1.0,
                    seed=1)
    first, second = run.records
    # Each token is stamped 30 ms before step() returned: consecutive tokens of a request 30 ms apart, not 60.
    assert first.token_s[1] - first.token_s[0] == pytest.approx(0.03, abs=0.01)
    assert time.perf_counter() - t0 > second.token_s[-1] + 0.02
    due = arrival_times(2, 5.0, 1.0, seed=1)
    # While request 1 is due later, step() is told how long it may wait; once none is due, it is not bounded.
    assert engine.timeouts[0] == pytest.approx(due[1] - first.send_s, abs=0.01) and engine.timeouts[-1] is None

"""The emulated link's pacing, on a fake clock: a chunk that was waiting starts on paper when the link is
free, not when the worker thread gets round to it; one that was not waiting starts when it is called."""

import pytest
import torch

from promoe_bench import links
from promoe_bench.links import EmulatedLink

GBPS, LATENCY_US = 1.0, 10.0
NBYTES = 1_000_000
NOMINAL_S = LATENCY_US * 1e-6 + NBYTES / (GBPS * 1e9)  # 1.01 ms
TURNAROUND_S = 300e-6


class FakeTime:
    """perf_counter and sleep on a clock that moves only when slept on (sleep(0) moves it 1 us)."""

    def __init__(self):
        self.ns = 10**12

    def perf_counter_ns(self) -> int:
        return self.ns

    def perf_counter(self) -> float:
        return self.ns * 1e-9

    def sleep(self, seconds: float) -> None:
        self.ns += max(round(seconds * 1e9), 1000)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(links, "time", fake)
    return fake


@pytest.fixture
def link_and_buffers():
    src = torch.zeros(NBYTES // 4)
    return EmulatedLink(GBPS, LATENCY_US), torch.empty_like(src), src


def seconds(transfer) -> float:
    return (transfer.end - transfer.start) * 1e-9


def test_a_chunk_the_worker_found_waiting_lands_one_nominal_copy_after_the_previous(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    first = link.copy(dst, src)
    assert seconds(first) == pytest.approx(NOMINAL_S, abs=2e-6)
    last = first
    for _ in range(4):
        clock.sleep(TURNAROUND_S)  # the worker landing, locking and picking on a busy machine
        last = link.copy(dst, src, ready_ns=first.start)
    # back to back on paper: the turnaround is paid back, the link runs at its set bandwidth
    assert (last.end - first.end) * 1e-9 == pytest.approx(4 * NOMINAL_S, abs=5e-6)
    assert link.counters.copies == 5 and link.counters.bytes == 5 * NBYTES


def test_a_chunk_requested_during_the_turnaround_starts_at_its_request(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    first = link.copy(dst, src)
    clock.sleep(TURNAROUND_S)
    requested = clock.perf_counter_ns()  # after the previous chunk was due: the link sat idle until then
    clock.sleep(TURNAROUND_S)
    second = link.copy(dst, src, ready_ns=requested)
    assert (second.end - requested) * 1e-9 == pytest.approx(NOMINAL_S, abs=2e-6)
    assert second.end > first.end + NOMINAL_S * 1e9


def test_a_chunk_that_was_not_waiting_takes_its_nominal_time_from_its_call(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    link.copy(dst, src)
    clock.sleep(TURNAROUND_S)
    second = link.copy(dst, src)  # the worker had been idle: no credit
    assert seconds(second) == pytest.approx(NOMINAL_S, abs=2e-6)


def test_the_credit_for_a_late_worker_is_bounded(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    first = link.copy(dst, src)
    clock.sleep(0.05)  # a worker 50 ms late: the link would have been idle most of it
    second = link.copy(dst, src, ready_ns=first.start)
    assert seconds(second) == pytest.approx(NOMINAL_S - EmulatedLink.MAX_CREDIT_S, abs=2e-6)

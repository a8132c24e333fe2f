"""The emulated link's pacing, on a fake clock: a queue on paper, like a copy engine's. A chunk issued while
the link is busy starts when the chunk before it is due, however late the worker completes it; one
issued on an idle link starts at its issue; a chunk lands no earlier than it is due.
"""

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


def test_chunks_issued_behind_one_another_run_back_to_back_however_late_the_worker(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    first = link.issue(dst, src)
    second = link.issue(dst, src)  # queued behind the first
    landed = link.complete(first)
    assert seconds(landed) == pytest.approx(NOMINAL_S, abs=2e-6)
    last = second
    for _ in range(4):
        clock.sleep(TURNAROUND_S)  # the worker landing, locking and picking on a busy machine
        link.complete(last)
        last = link.issue(dst, src)  # issued while the one before it is still on the link
    last = link.complete(last)
    # back to back on paper: the worker's turnarounds cost the link nothing
    assert (last.end - landed.end) * 1e-9 == pytest.approx(5 * NOMINAL_S, abs=5e-6)
    assert link.counters.copies == 6 and link.counters.bytes == 6 * NBYTES
    assert torch.equal(dst, src)


def test_a_chunk_issued_on_an_idle_link_starts_at_its_issue(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    first = link.complete(link.issue(dst, src))
    clock.sleep(TURNAROUND_S)  # the link sat idle
    issued_at = clock.perf_counter_ns()
    second = link.complete(link.issue(dst, src))
    assert second.start == issued_at
    assert seconds(second) == pytest.approx(NOMINAL_S, abs=2e-6)
    assert second.start > first.end


def test_a_chunk_never_lands_before_it_is_due_and_a_late_completion_lands_late(clock, link_and_buffers):
    link, dst, src = link_and_buffers
    transfer = link.issue(dst, src)
    assert link.complete(transfer).end >= transfer.end  # the worker slept until it was due
    late = link.issue(dst, src)
    clock.sleep(0.05)  # the worker 50 ms late: the chunk lands when it is completed, not on paper
    landed = link.complete(late)
    assert landed.end == clock.perf_counter_ns() and landed.end > late.end
    assert link.counters.busy_s == pytest.approx(NOMINAL_S + seconds(landed), abs=1e-9)

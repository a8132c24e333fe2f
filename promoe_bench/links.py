"""How bytes cross from host to device: a CUDA copy stream, or an emulated link on the CPU.

A link moves one chunk and returns once it has landed, with what compute must wait on (a CUDA event,
or None). It knows nothing of priorities or caches; the copy engine decides what to move and when.
"""

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy
import torch


@dataclass
class LinkCounters:
    bytes: int = 0
    copies: int = 0
    busy_s: float = 0.0

    @property
    def achieved_gbps(self) -> float | None:
        return self.bytes / self.busy_s / 1e9 if self.busy_s else None


class Transfer(NamedTuple):
    """One chunk's copy: what compute waits on (a CUDA event, or None), and when the copy started and
    ended as clock stamps (timing events on CUDA, perf_counter_ns on the CPU)."""

    landed: object
    start: object
    end: object


class EmulatedLink:
    """A host-to-device link on a CPU-only machine: a real copy into the slot buffer, paced so each
    copy takes latency + bytes / bandwidth, like a PCIe transfer would.

    Sleeping wakes up late (by the scheduler's whim, more on a loaded machine). A copy that follows
    the previous one closely starts that much earlier on paper, so lateness is paid back by the next
    copy instead of piling up: back-to-back copies run at the set bandwidth on average.
    """

    BACK_TO_BACK_S = 1e-3

    def __init__(self, gbps: float, latency_us: float):
        self.gbps = gbps
        self.latency_s = latency_us * 1e-6
        self.counters = LinkCounters()
        self._last_end = float("-inf")  # perf_counter seconds when the previous copy returned
        self._lateness = 0.0  # how far past its deadline the previous copy returned

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> Transfer:
        start_ns = time.perf_counter_ns()
        start = start_ns * 1e-9
        # a plain single-threaded memcpy: torch's copy_ would wake its intra-op threads, which fight
        # compute for the cores of a small machine (measured: 1 MiB in 4.8 ms instead of 0.03 ms)
        numpy.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
        nbytes = src.numel() * src.element_size()
        credit = self._lateness if start - self._last_end < self.BACK_TO_BACK_S else 0.0
        deadline = start - credit + self.latency_s + nbytes / (self.gbps * 1e9)
        remaining = deadline - time.perf_counter()
        if remaining > 2e-4:  # sleep most of the wait, then yield in small steps until the deadline
            time.sleep(remaining - 1e-4)
        while time.perf_counter() < deadline:
            time.sleep(0)
        end_ns = time.perf_counter_ns()
        end = end_ns * 1e-9
        self._last_end, self._lateness = end, end - deadline
        self.counters.bytes += nbytes
        self.counters.copies += 1
        self.counters.busy_s += end - start
        return Transfer(None, start_ns, end_ns)

    def describe(self) -> dict:
        return {"kind": "emulated", "gbps": self.gbps, "latency_us": self.latency_s * 1e6}


class CudaLink:
    """Asynchronous copies from pinned host memory on a dedicated copy stream, an event per chunk."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.counters = LinkCounters()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> Transfer:
        start = time.perf_counter()
        with torch.cuda.stream(self.stream):
            if after is not None:  # the slot's previous expert may still be in use by queued compute
                self.stream.wait_event(after)
            started, landed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            started.record(self.stream)
            dst.copy_(src, non_blocking=True)
            landed.record(self.stream)
        # The worker waits for each chunk so a HIGH task can overtake at the next chunk boundary;
        # this blocks the copy thread only, never compute.
        landed.synchronize()
        self.counters.bytes += src.numel() * src.element_size()
        self.counters.copies += 1
        self.counters.busy_s += time.perf_counter() - start
        return Transfer(landed, started, landed)

    def describe(self) -> dict:
        return {"kind": "cuda", "stream": "dedicated copy stream"}

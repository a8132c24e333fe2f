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

    On paper a chunk starts when it is waiting and the link is free, as on a copy engine with a
    queue: not when the worker thread gets round to it. That thread wakes late from sleeping and
    waits for the GIL while compute runs Python (0.1-0.4 ms per chunk measured on a busy 2-core CPU,
    10-40% of a chunk), a cost of this machine that depends on what compute is doing, not on the
    link. So a chunk that was already waiting (`ready_ns`) starts on paper when the previous one was
    due, and back-to-back copies run at the set bandwidth on average. The credit is bounded.
    """

    MAX_CREDIT_S = 1e-3

    def __init__(self, gbps: float, latency_us: float):
        self.gbps = gbps
        self.latency_s = latency_us * 1e-6
        self.counters = LinkCounters()
        self._free_at = float("-inf")  # perf_counter seconds when the previous copy was due: the link free on paper

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, ready_ns: int | None = None) -> Transfer:
        """`ready_ns`: since when (perf_counter_ns) the chunk was waiting to move; None: it was not (the
        worker had nothing to move until now)."""
        start_ns = time.perf_counter_ns()
        start = start_ns * 1e-9
        # a plain single-threaded memcpy: torch's copy_ would wake its intra-op threads, which fight
        # compute for the cores of a small machine (measured: 1 MiB in 4.8 ms instead of 0.03 ms)
        numpy.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
        nbytes = src.numel() * src.element_size()
        begin = start
        if ready_ns is not None:
            begin = min(start, max(ready_ns * 1e-9, self._free_at, start - self.MAX_CREDIT_S))
        deadline = begin + self.latency_s + nbytes / (self.gbps * 1e9)
        remaining = deadline - time.perf_counter()
        if remaining > 2e-4:  # sleep most of the wait, then yield in small steps until the deadline
            time.sleep(remaining - 1e-4)
        while time.perf_counter() < deadline:
            time.sleep(0)
        end_ns = time.perf_counter_ns()
        self._free_at = deadline
        self.counters.bytes += nbytes
        self.counters.copies += 1
        self.counters.busy_s += end_ns * 1e-9 - start
        return Transfer(None, start_ns, end_ns)

    def describe(self) -> dict:
        return {"kind": "emulated", "gbps": self.gbps, "latency_us": self.latency_s * 1e6}


class CudaLink:
    """Asynchronous copies from pinned host memory on a dedicated copy stream, an event per chunk."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.counters = LinkCounters()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, ready_ns: int | None = None) -> Transfer:
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

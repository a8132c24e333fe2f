"""How bytes cross from host to device: a CUDA copy stream, or an emulated link on the CPU.

A link works like a copy engine's queue. `issue` puts one chunk's copy on the link and returns at
once, with what compute can wait on; the chunk moves after the ones issued before it. `complete` (the
copy engine's worker, never compute) blocks until the chunk has landed and returns its final Transfer.
A link knows nothing of priorities or caches; the copy engine decides what to move and when.

`device_waits` says where compute waits for a chunk: on the device, queued behind the chunk's event
(CUDA: the host goes on), or on the host until the chunk has landed (the CPU, where compute is the host).
"""

import time
from dataclasses import dataclass

import numpy
import torch


@dataclass
class LinkCounters:
    bytes: int = 0
    copies: int = 0
    busy_s: float = 0.0  # time the link spent moving chunks, from the copies' own start and end

    @property
    def achieved_gbps(self) -> float | None:
        return self.bytes / self.busy_s / 1e9 if self.busy_s else None


@dataclass
class Transfer:
    """One chunk's copy. `landed`: what compute waits on (a CUDA event; None on the CPU); `start`, `end`:
    when the copy started and ended, as clock stamps (timing events on CUDA, perf_counter_ns on the CPU).
    On the CPU `end` is when the chunk is due until `complete` sets when it landed."""

    landed: object
    start: object
    end: object
    nbytes: int
    pending: tuple | None = None  # the emulated link's (dst, src), copied by `complete`


class EmulatedLink:
    """A host-to-device link on a CPU-only machine, paced like a PCIe copy engine: each chunk takes
    latency + bytes / bandwidth, after the chunks issued before it (a queue on paper, `_free_at`).

    `issue` only books the chunk's time on paper; `complete`, on the copy worker, copies the bytes for
    real and sleeps until the chunk is due. Since the next chunk was issued before this one lands, it
    starts on paper when this one is due, however late the worker wakes: the link runs back to back
    at its set bandwidth while the queue holds work, as a copy engine does."""

    device_waits = False

    def __init__(self, gbps: float, latency_us: float):
        self.gbps = gbps
        self.latency_s = latency_us * 1e-6
        self.counters = LinkCounters()
        self._free_at = 0  # perf_counter_ns when the last chunk issued is due: the link free on paper
        self._landed_at = 0  # perf_counter_ns when the last chunk completed landed

    def issue(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> Transfer:
        nbytes = src.numel() * src.element_size()
        start = max(time.perf_counter_ns(), self._free_at)
        self._free_at = start + round((self.latency_s + nbytes / (self.gbps * 1e9)) * 1e9)
        return Transfer(None, start, self._free_at, nbytes, (dst, src))

    def complete(self, transfer: Transfer) -> Transfer:
        (dst, src), transfer.pending = transfer.pending, None  # the slot's memory must not outlive the runtime
        # a plain single-threaded memcpy: torch's copy_ would wake its intra-op threads, which fight
        # compute for the cores of a small machine (measured: 1 MiB in 4.8 ms instead of 0.03 ms)
        numpy.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
        remaining = (transfer.end - time.perf_counter_ns()) * 1e-9
        if remaining > 2e-4:  # sleep most of the wait, then yield in small steps until the chunk is due
            time.sleep(remaining - 1e-4)
        while time.perf_counter_ns() < transfer.end:
            time.sleep(0)
        # landed when due, or later if the memcpy or this thread's wake-up ran past it; it held the link
        # from its start on paper or the landing before it, whichever came later
        start = max(transfer.start, self._landed_at)
        self._landed_at = max(transfer.end, time.perf_counter_ns())
        landed = Transfer(None, start, self._landed_at, transfer.nbytes)
        self.counters.bytes += landed.nbytes
        self.counters.copies += 1
        self.counters.busy_s += (landed.end - landed.start) * 1e-9
        return landed

    def describe(self) -> dict:
        return {"kind": "emulated", "gbps": self.gbps, "latency_us": self.latency_s * 1e6}


class CudaLink:
    """Asynchronous copies from pinned host memory on a dedicated copy stream of `device`, a timing event
    before and after each chunk. The stream is the queue: a chunk issued behind another starts the
    moment the first lands, with no host in between."""

    device_waits = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.counters = LinkCounters()

    def issue(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> Transfer:
        stream = self.stream
        started, landed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):  # the stream's device too
            if after is not None:  # the slot's previous expert may still be read by queued compute
                stream.wait_event(after)
            started.record(stream)
            dst.copy_(src, non_blocking=True)
            landed.record(stream)
        return Transfer(landed, started, landed, src.numel() * src.element_size())

    def complete(self, transfer: Transfer) -> Transfer:
        # host sync, on the copy worker's thread only (the GIL is released while it waits): the cache
        # learns that the slot holds the chunk, for eviction and the hit counts; compute never waits here
        transfer.landed.synchronize()
        self.counters.bytes += transfer.nbytes
        self.counters.copies += 1
        self.counters.busy_s += transfer.start.elapsed_time(transfer.landed) * 1e-3  # ms, from the copy's events
        return transfer

    def describe(self) -> dict:
        return {"kind": "cuda", "stream": "dedicated copy stream", "device": str(self.device)}

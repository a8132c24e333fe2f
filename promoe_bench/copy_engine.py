"""The copy engine: experts moved host -> device as the copy scheduler says, a few chunks queued ahead.

Which chunk moves next is the scheduler's (copy_scheduler.py, shared with the simulator); moving the
bytes is the link's. This module adds the lock, the queue ahead and the waiting:
- a chunk is issued to the link (put on its queue: a CUDA copy stream) by whichever thread makes it
  movable: compute when it requests, releases or evicts, the worker when a chunk lands. Up to DEPTH
  chunks are on the link at once, so the link goes from one chunk to the next without waiting for any
  host thread, while a HIGH task still waits behind at most DEPTH chunks;
- one worker thread waits for the oldest chunk on the link to land (`link.complete`), then tells the
  cache, for eviction and the hit counts;
- compute waits in `wait` until the chunks it needs are issued (when the link's `device_waits`: compute
  then queues behind their events on the device) or have landed (on the CPU, where compute is the host).
"""

import threading
from collections import deque

from .cache import Entry, ExpertCache
from .copy_scheduler import CopyScheduler, CopyTask, Priority
from .expert_store import ExpertStore
from .slot_pool import SlotPool

__all__ = ["CopyEngine", "Priority"]

DEPTH = 2  # chunks on the link at once: the one moving and one queued behind it


class CopyEngine:
    def __init__(self, store: ExpertStore, pool: SlotPool, cache: ExpertCache, link, record_chunks: bool = True,
                 depth: int = DEPTH):
        """`record_chunks`: keep a timeline row per landed chunk; `depth`: chunks on the link at once (1: a
        HIGH task waits behind one chunk at most, but the link idles while the worker turns around)."""
        self.store, self.pool, self.cache, self.link = store, pool, cache, link
        self.depth = depth
        self.scheduler = CopyScheduler(cache, store.num_layers, record_chunks=record_chunks)
        self.counters = self.scheduler.counters
        self._on_link: deque[tuple[CopyTask, object]] = deque()  # (task, Transfer) issued, oldest first
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="promoe-copy", daemon=True)
        self._worker.start()

    # -- called by the runtime (compute thread) ------------------------------------------------

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        with self._cv:
            self.scheduler.request(layer, expert, priority, chunked)
            self._issue()

    def drop_low(self, layer: int) -> int:
        with self._cv:
            dropped = self.scheduler.drop_low(layer)
            self._issue()  # a slot given back may let a queued task start
            return dropped

    def evict(self, layer: int, expert: int) -> None:
        with self._cv:
            if self.scheduler.evict(layer, expert):
                self._issue()  # a task may be waiting for this slot

    def begin_forward(self, layer: int, order: list[int], tokens: dict[int, int] | None = None) -> int:
        """The layer's routed experts (`order`) are its current forward's; returns how many of them have
        landed. Those stay until `computed` or `release`: pending experts are no eviction candidates, and only
        an expert compute awaits may take a pending one's slot, which none will while all have landed."""
        with self._cv:
            self.cache.begin_forward(layer, order, tokens)
            entries = self.cache.entries(layer)
            return sum(1 for expert in order if (entry := entries.get(expert)) is not None and entry.ready)

    def reorder(self, layer: int, order: list[int]) -> None:
        with self._cv:
            self.cache.reorder(layer, order)

    def wait(self, layer: int, expert: int, chunks: int) -> tuple[Entry, bool]:
        """Block until `chunks` chunks of the expert are issued (`link.device_waits`) or have landed, and
        keep it from eviction until `release`. Returns the entry and whether they had landed when asked
        (if not, compute waits: on the device behind `entry.events[chunks - 1]`, or it has waited here)."""
        issued = self.link.device_waits
        with self._cv:
            entry = self.scheduler.need(layer, expert, chunks, issued)
            landed = entry is not None and entry.chunks_ready >= chunks
            while entry is None:
                self._issue()  # a copy `need` queued, or the last-resort slot it allows
                entry = self.scheduler.need(layer, expert, chunks, issued)
                if entry is None:
                    self._raise_worker_error()
                    self._cv.wait()
                    entry = self.scheduler.need(layer, expert, chunks, issued)
            return entry, landed

    def release(self, layer: int, expert: int) -> None:
        with self._cv:
            self.scheduler.release(layer, expert)
            if self.scheduler.busy:  # a queued copy may be waiting for this slot
                self._issue()

    def computed(self, layer: int, experts: list[int]) -> None:
        """The layer's `experts` have done their work in this forward, in this order (the path on which
        compute took no wait, so none was marked in use)."""
        with self._cv:
            for expert in experts:
                self.scheduler.release(layer, expert)
            if self.scheduler.busy:
                self._issue()

    def take_counters(self) -> tuple[list[int], list[int], list[int], list[int], list[dict]]:
        """The scheduler's counters since the last call."""
        with self._cv:
            return self.scheduler.take_counters()

    def idle(self) -> None:
        """Block until every queued copy has landed (used between phases, never inside a step)."""
        with self._cv:
            while self.scheduler.busy and self._error is None:
                self._cv.wait()
            self._raise_worker_error()

    def close(self) -> None:
        """Stop the worker once the chunks on the link have landed (their slots' memory must outlive them)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()

    # -- the link's queue ----------------------------------------------------------------------

    def _issue(self) -> None:
        """Put chunks on the link while it holds fewer than `depth` and one can move (the lock is held)."""
        while not self._closed and len(self._on_link) < self.depth and (pick := self.scheduler.next_chunk()):
            task, chunk = pick
            slot = task.entry.slot
            transfer = self.link.issue(self.pool.chunk(slot, chunk), self.store.chunk(task.layer, task.expert, chunk),
                                       self.pool.released_event(slot))
            self.scheduler.issued(task, transfer)
            self._on_link.append((task, transfer))
            self._cv.notify_all()  # the worker waits for work on the link; compute perhaps for this chunk

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._on_link and not self._closed:
                        self._cv.wait()
                    if not self._on_link:
                        return  # closed, and nothing left on the link
                    task, transfer = self._on_link[0]
                landed = self.link.complete(transfer)  # blocks this thread only, without the lock
                with self._cv:
                    self._on_link.popleft()
                    self.scheduler.landed(task, landed)
                    self._issue()
                    self._cv.notify_all()
        except BaseException as error:  # surface worker failures in the compute thread, never hang it
            with self._cv:
                self._error = error
                self._cv.notify_all()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("copy worker failed") from self._error
        if self._closed:
            raise RuntimeError("the copy engine is closed")

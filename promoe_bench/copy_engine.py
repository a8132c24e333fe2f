"""The copy engine: one worker thread moving experts host -> device, as the copy scheduler says.

Which chunk moves next is the scheduler's (copy_scheduler.py, shared with the simulator); moving the
bytes is the link's. This module adds the thread, the lock and the waiting: compute blocks in `wait`
until the chunks it needs have landed, the worker until there is something it may move.
"""

import threading

from .cache import Entry, ExpertCache
from .copy_scheduler import CopyScheduler, Priority
from .expert_store import ExpertStore
from .slot_pool import SlotPool

__all__ = ["CopyEngine", "Priority"]


class CopyEngine:
    def __init__(self, store: ExpertStore, pool: SlotPool, cache: ExpertCache, link, record_chunks: bool = True):
        """`record_chunks`: keep a timeline row per landed chunk."""
        self.store, self.pool, self.cache, self.link = store, pool, cache, link
        self.scheduler = CopyScheduler(cache, store.num_layers, record_chunks=record_chunks)
        self.counters = self.scheduler.counters
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="promoe-copy", daemon=True)
        self._worker.start()

    # -- called by the runtime (compute thread) ------------------------------------------------

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        with self._cv:
            self.scheduler.request(layer, expert, priority, chunked)
            self._cv.notify_all()

    def drop_low(self, layer: int) -> int:
        with self._cv:
            return self.scheduler.drop_low(layer)

    def evict(self, layer: int, expert: int) -> None:
        with self._cv:
            if self.scheduler.evict(layer, expert):
                self._cv.notify_all()  # a task may be waiting for this slot

    def begin_forward(self, layer: int, order: list[int], tokens: dict[int, int] | None = None) -> None:
        with self._cv:
            self.cache.begin_forward(layer, order, tokens)

    def reorder(self, layer: int, order: list[int]) -> None:
        with self._cv:
            self.cache.reorder(layer, order)

    def wait(self, layer: int, expert: int, chunks: int) -> tuple[Entry, bool]:
        """Block until `chunks` chunks of the expert have landed, and keep it from eviction until
        `release`. Returns the entry and whether compute had to wait (a stall)."""
        with self._cv:
            stalled = False
            while (entry := self.scheduler.need(layer, expert, chunks)) is None:
                stalled = True
                self._raise_worker_error()
                self._cv.notify_all()  # the worker may now claim a slot as a last resort, or copy a refetch
                self._cv.wait()
            return entry, stalled

    def release(self, layer: int, expert: int) -> None:
        with self._cv:
            self.scheduler.release(layer, expert)
            if self.scheduler.busy:  # a queued copy may be waiting for this slot; else waking the worker costs a switch
                self._cv.notify_all()

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
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()

    # -- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                waited = False
                with self._cv:
                    while not self._closed and (pick := self.scheduler.next_chunk()) is None:
                        waited = True
                        self._cv.wait()
                    if self._closed:
                        return
                task, chunk = pick
                src = self.store.chunk(task.layer, task.expert, chunk)
                dst = self.pool.chunk(task.entry.slot, chunk)
                # a chunk found at once was waiting since its request (or since the previous chunk landed)
                transfer = self.link.copy(dst, src, self.pool.released_event(task.entry.slot),
                                          ready_ns=None if waited else task.queued_ns)
                with self._cv:
                    self.scheduler.landed(task, src.numel() * src.element_size(), transfer)
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

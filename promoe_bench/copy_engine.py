"""The copy engine: one worker thread moving experts host -> device, HIGH before LOW, chunk by chunk.

Scheduling (which chunk next) lives here; moving the bytes is the link's job. A task is one expert; the
worker re-picks after every chunk of a chunked task, so a HIGH task waits at most one chunk behind a
LOW one, and compute waits per chunk through `wait`. An unchunked task moves the expert's three chunks
back to back and shows them to compute only when all have landed (the ablation of chunking).
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from .cache import NUM_CHUNKS, Entry, ExpertCache
from .expert_store import ExpertStore
from .slot_pool import SlotPool
from .timeline import event


class Priority(IntEnum):
    HIGH = 0  # precise: the router's real choice
    LOW = 1  # speculative: a prediction


@dataclass
class CopyTask:
    layer: int
    expert: int
    priority: Priority
    chunked: bool
    entry: Entry | None = None  # claimed when the worker starts the task
    cancelled: bool = False  # dropped while its chunk was on the link: forgotten once it lands
    dropped: bool = False  # dropped by early preemption, before or while being copied
    queued_ns: int = field(default_factory=time.perf_counter_ns)


@dataclass
class CopyCounters:
    """Per layer, cumulative; the recorder takes differences."""

    copies: list[int]
    bytes: list[int]
    dropped: int = 0  # LOW tasks dropped before they were copied
    refetches: int = 0  # experts compute needed that nobody had requested (or that lost their slot)


class CopyEngine:
    def __init__(self, store: ExpertStore, pool: SlotPool, cache: ExpertCache, link):
        self.store, self.pool, self.cache, self.link = store, pool, cache, link
        self.counters = CopyCounters([0] * store.num_layers, [0] * store.num_layers)
        self._landed: list[dict] = []  # timeline rows of chunks landed since `take_counters`
        self._cv = threading.Condition()
        self._queues = {Priority.HIGH: deque(), Priority.LOW: deque()}
        self._tasks: dict[tuple[int, int], CopyTask] = {}
        self._awaited: tuple[int, int] | None = None
        self._active: CopyTask | None = None  # the task whose chunk is on the link now
        self._closed = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="promoe-copy", daemon=True)
        self._worker.start()

    # -- called by the runtime (compute thread) ------------------------------------------------

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        """Copy `expert` of `layer` unless it is resident or already on its way (a HIGH request
        promotes a queued LOW task, keeping the chunks it has)."""
        with self._cv:
            entry = self.cache.lookup(layer, expert)
            task = self._tasks.get((layer, expert))
            if task is None and entry is not None:
                if priority is Priority.LOW:  # a prefetch of a cached expert counts as an access
                    self.cache.policy.touch(layer, expert)
                return
            if task is None:
                task = CopyTask(layer, expert, priority, chunked)
                self._tasks[(layer, expert)] = task
                self._queues[priority].append(task)
            task.cancelled = False
            if priority < task.priority:
                self._queues[task.priority].remove(task)
                task.priority = priority
                self._queues[priority].append(task)
            self._cv.notify_all()

    def drop_low(self, layer: int) -> int:
        """Drop `layer`'s LOW tasks; a partly copied expert gives its slot back (an unchunked one on the
        link lands whole first, then goes). Returns how many."""
        with self._cv:
            dropped = [t for t in self._queues[Priority.LOW] if t.layer == layer and not t.cancelled]
            for task in dropped:
                task.dropped = True
                if task is self._active:
                    task.cancelled = True
                else:
                    self._forget(task)
            self.counters.dropped += len(dropped)
            return len(dropped)

    def evict(self, layer: int, expert: int) -> None:
        with self._cv:
            entry = self.cache.lookup(layer, expert)
            if entry is not None and not entry.copying and (layer, expert) not in self.cache.in_use:
                self.cache.remove(layer, expert)
                self.cache.evictions[layer] += 1
                self._cv.notify_all()  # a task may be waiting for this slot

    def begin_forward(self, layer: int, order: list[int]) -> None:
        with self._cv:
            self.cache.begin_forward(layer, order)

    def wait(self, layer: int, expert: int, chunks: int) -> tuple[Entry, bool]:
        """Block until `chunks` chunks of the expert have landed, and keep it from eviction until
        `release`. An expert nobody asked for (or that lost its slot) is requested HIGH.
        Returns the entry and whether compute had to wait (a stall)."""
        key = (layer, expert)
        with self._cv:
            self.cache.in_use.add(key)
            entry = self.cache.lookup(layer, expert)
            if entry is not None and entry.chunks_ready >= chunks:
                return entry, False
            self._awaited = key
            self._cv.notify_all()
            while True:
                self._raise_worker_error()
                entry = self.cache.lookup(layer, expert)
                if entry is not None and entry.chunks_ready >= chunks:
                    self._awaited = None
                    return entry, True
                if entry is None and key not in self._tasks:
                    self.counters.refetches += 1
                    task = CopyTask(layer, expert, Priority.HIGH, True)
                    self._tasks[key] = task
                    self._queues[Priority.HIGH].append(task)
                    self._cv.notify_all()
                self._cv.wait()

    def release(self, layer: int, expert: int) -> None:
        with self._cv:
            self.cache.in_use.discard((layer, expert))
            self.cache.computed(layer, expert)
            self._cv.notify_all()

    def take_counters(self) -> tuple[list[int], list[int], list[int], list[int], list[dict]]:
        """Cumulative copies, bytes, evictions and wasted bytes per layer, and the timeline rows of the
        chunks landed since the last call, taken together so that they always agree. A row's `task` is
        its CopyTask, to read `dropped` from once the run is over (a task may be dropped later)."""
        with self._cv:
            landed, self._landed = self._landed, []
            return (list(self.counters.copies), list(self.counters.bytes), list(self.cache.evictions),
                    list(self.cache.wasted_bytes), landed)

    def idle(self) -> None:
        """Block until every queued copy has landed (used between phases, never inside a step)."""
        with self._cv:
            while self._tasks and self._error is None:
                self._cv.wait()
            self._raise_worker_error()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()

    # -- the worker ------------------------------------------------------------------------------

    def _forget(self, task: CopyTask) -> None:
        self._queues[task.priority].remove(task)
        del self._tasks[(task.layer, task.expert)]
        if task.entry is not None:
            self.cache.remove(task.layer, task.expert)

    def _next(self) -> CopyTask | None:
        """The first HIGH task, else the first LOW task, that has or can claim a slot; None when
        closed. A task whose layer has no slot to give right now lets the ones behind it go first
        (compute may be waiting on one of those), and is retried as soon as a slot frees up."""
        while not self._closed:
            for priority in (Priority.HIGH, Priority.LOW):
                for task in self._queues[priority]:
                    if task.entry is None:
                        key = (task.layer, task.expert)
                        task.entry = self.cache.claim(task.layer, task.expert, last_resort=self._awaited == key,
                                                      prefetch=task.priority is Priority.LOW)
                    if task.entry is not None:
                        return task
            self._cv.wait()
        return None

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    task = self._next()
                    if task is None:
                        return
                    self._active = task
                    entry = task.entry
                    first = entry.chunks_ready
                    last = first + 1 if task.chunked else NUM_CHUNKS
                for chunk in range(first, last):
                    src = self.store.chunk(task.layer, task.expert, chunk)
                    dst = self.pool.chunk(entry.slot, chunk)
                    transfer = self.link.copy(dst, src, self.pool.released_event(entry.slot))
                    nbytes = src.numel() * src.element_size()
                    with self._cv:
                        entry.events.append(transfer.landed)
                        self.counters.bytes[task.layer] += nbytes
                        self._landed.append({**event(None, task.layer, "copy", "chunk", transfer.start, transfer.end,
                                                     bytes=nbytes, expert=task.expert, priority=task.priority.name,
                                                     queued_s=task.queued_ns), "task": task})
                        if task.chunked or chunk + 1 == NUM_CHUNKS:  # unchunked: compute sees whole experts only
                            entry.chunks_ready = len(entry.events)
                        finished = entry.ready or (task.cancelled and task.chunked)
                        if task.cancelled and finished:
                            self._forget(task)
                        elif entry.ready:
                            entry.copying = False
                            self.counters.copies[task.layer] += 1
                            self._queues[task.priority].remove(task)
                            del self._tasks[(task.layer, task.expert)]
                        self._active = task if chunk + 1 < last and not finished else None
                        self._cv.notify_all()
                    if finished:
                        break
        except BaseException as error:  # surface worker failures in the compute thread, never hang it
            with self._cv:
                self._error = error
                self._cv.notify_all()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("copy worker failed") from self._error
        if self._closed:
            raise RuntimeError("the copy engine is closed")

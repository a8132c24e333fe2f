"""What the link moves next, and the bookkeeping when a chunk is issued and when it lands: HIGH before LOW,
chunk by chunk.

Pure state, no threads and no clock, so that the runtime's copy engine (real bytes on a real or emulated
link) and the simulator's (a link modelled in simulated time) schedule exactly alike. Callers serialise
access (the engine holds its lock). A task is one expert. Its chunks are first issued to the link (put on
its queue: compute may then wait for them on a device) and later land (the cache knows they are there).
The next chunk is picked anew after every chunk of a chunked task, so a HIGH task waits only behind the
chunks already on the link's queue. An unchunked task moves the expert's three chunks back to back and
shows them to compute only when all have been issued (on a device) or landed (the ablation of chunking).
"""

import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from .cache import NUM_CHUNKS, Entry, ExpertCache
from .timeline import event


class Priority(IntEnum):
    HIGH = 0  # precise: the router's real choice
    LOW = 1  # speculative: a prediction


HIGH, LOW = Priority.HIGH, Priority.LOW  # the members as plain names: a member read through its class is slow


@dataclass(slots=True)
class CopyTask:
    layer: int
    expert: int
    priority: Priority
    chunked: bool
    entry: Entry | None = None  # claimed when its first chunk is picked
    cancelled: bool = False  # dropped with chunks on the link: forgotten once they have landed
    dropped: bool = False  # dropped by early preemption, before or while being copied
    queued_ns: int = 0  # when it was requested, on the scheduler's clock
    issued: list = field(default_factory=list)  # the links' Transfers of its chunks put on the link so far
    landed: int = 0  # of those, how many have landed

    @property
    def on_link(self) -> bool:
        """Some chunk of it is issued and has not landed yet."""
        return len(self.issued) > self.landed


@dataclass
class CopyCounters:
    """Per layer, cumulative; the recorder takes differences."""

    copies: list[int]
    bytes: list[int]
    dropped: int = 0  # LOW tasks dropped before they were copied
    refetches: int = 0  # experts compute needed that nobody had requested (or that lost their slot)


class CopyScheduler:
    def __init__(self, cache: ExpertCache, num_layers: int, now_ns=time.perf_counter_ns, record_chunks: bool = True):
        """`now_ns`: the clock a task's request time is read from (the simulator's is simulated);
        `record_chunks`: keep a timeline row per landed chunk."""
        self.cache = cache
        self.now_ns = now_ns
        self.record_chunks = record_chunks
        self.counters = CopyCounters([0] * num_layers, [0] * num_layers)
        self._landed: list[dict] = []  # timeline rows of chunks landed since the owner last took them
        self._taken = ([0] * num_layers,) * 4  # the cumulative counters when the owner last took them
        self._queues = (deque(), deque())  # by priority, HIGH first
        self._tasks: dict[tuple[int, int], CopyTask] = {}
        self.awaited: tuple[int, int] | None = None  # what compute is blocked on
        self.active: CopyTask | None = None  # an unchunked task part of whose chunks are issued: it goes on

    @property
    def busy(self) -> bool:
        """Some copy is queued or under way."""
        return bool(self._tasks)

    # -- compute's side --------------------------------------------------------------------------

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        """Copy `expert` of `layer` unless it is resident or already on its way (a HIGH request
        promotes a queued LOW task, keeping the chunks it has)."""
        entry = self.cache.lookup(layer, expert)
        task = self._tasks.get((layer, expert))
        if task is None and entry is not None:
            if priority is LOW:  # a prefetch of a cached expert counts as an access
                self.cache.policy.touch(layer, expert)
            return
        if task is None:
            task = CopyTask(layer, expert, priority, chunked, queued_ns=self.now_ns())
            self._tasks[(layer, expert)] = task
            self._queues[priority].append(task)
        task.cancelled = False
        if priority < task.priority:
            self._queues[task.priority].remove(task)
            task.priority = priority
            self._queues[priority].append(task)

    def drop_low(self, layer: int) -> int:
        """Drop `layer`'s LOW tasks; a partly copied expert gives its slot back once its chunks on the link
        have landed (an unchunked one lands whole first, then goes). Returns how many."""
        dropped = [t for t in self._queues[LOW] if t.layer == layer and not t.cancelled]
        for task in dropped:
            task.dropped = True
            if task.on_link or task is self.active:
                task.cancelled = True
            else:
                self._forget(task)
        self.counters.dropped += len(dropped)
        return len(dropped)

    def evict(self, layer: int, expert: int) -> bool:
        """Free a resident expert's slot unless it is being copied or used; whether it was freed."""
        entry = self.cache.lookup(layer, expert)
        if entry is None or entry.copying or (layer, expert) in self.cache.in_use:
            return False
        self.cache.remove(layer, expert)
        self.cache.evictions[layer] += 1
        return True

    def need(self, layer: int, expert: int, chunks: int, issued: bool = False) -> Entry | None:
        """Compute needs `chunks` chunks of the expert: keep it from eviction until `release`; the entry
        once they have landed (`issued`: once they are on the link, for compute that waits for them on the
        device, behind `entry.events`), else None, having made sure a copy is on its way (an expert nobody
        asked for, or that lost its slot, is requested HIGH) and marked it awaited (it may take a slot
        another expert of the forward is waiting for, as a last resort)."""
        key = (layer, expert)
        self.cache.in_use.add(key)
        entry = self.cache.lookup(layer, expert)
        if entry is not None and (entry.chunks_ready >= chunks or issued and len(entry.events) >= chunks):
            if self.awaited == key:
                self.awaited = None
            return entry
        self.awaited = key
        if entry is None and key not in self._tasks:
            self.counters.refetches += 1
            task = CopyTask(layer, expert, HIGH, True, queued_ns=self.now_ns())
            self._tasks[key] = task
            self._queues[HIGH].append(task)
        return None

    def release(self, layer: int, expert: int) -> None:
        self.cache.in_use.discard((layer, expert))
        self.cache.computed(layer, expert)

    # -- the link's side ---------------------------------------------------------------------------

    def next_chunk(self) -> tuple[CopyTask, int] | None:
        """The chunk to put on the link now: the next of an unchunked task under way, else the first chunk
        not yet issued of the first HIGH task, else of the first LOW task, that has or can claim a slot.
        None when nothing can move now. A task whose layer has no slot to give right now lets the ones
        behind it go first (compute may be waiting on one of those), and is retried later."""
        task = self.active or self._pick()
        return (task, len(task.issued)) if task is not None else None

    def _pick(self) -> CopyTask | None:
        full = set()  # layers that gave no slot in this pick: whether one can depends on the layer alone
        for queue in self._queues:
            for task in queue:
                if task.cancelled or len(task.issued) == NUM_CHUNKS:  # nothing of it left to issue
                    continue
                if task.entry is None:
                    last_resort = self.awaited == (task.layer, task.expert)
                    if task.layer in full and not last_resort:
                        continue
                    task.entry = self.cache.claim(task.layer, task.expert, last_resort, task.priority is LOW)
                    if task.entry is None:
                        full.add(task.layer)
                if task.entry is not None:
                    return task
        return None

    def issued(self, task: CopyTask, transfer) -> None:
        """The chunk `next_chunk` gave is on the link (`transfer`: the link's Transfer): publish it to
        compute, which on a device may queue behind it (an unchunked task's, once all three are on the
        link, each as the last one: compute sees whole experts only)."""
        task.issued.append(transfer)
        whole = len(task.issued) == NUM_CHUNKS
        if task.chunked:
            task.entry.events.append(transfer)
        elif whole:
            task.entry.events.extend([transfer] * NUM_CHUNKS)
        self.active = task if not (task.chunked or whole) else None

    def landed(self, task: CopyTask, transfer) -> None:
        """The oldest chunk of `task` on the link has landed (`transfer`: its final Transfer): count it and,
        when the task is done or was dropped, retire it."""
        entry = task.entry
        task.landed += 1
        self.counters.bytes[task.layer] += transfer.nbytes
        if self.record_chunks:
            self._landed.append({**event(None, task.layer, "copy", "chunk", transfer.start, transfer.end,
                                         bytes=transfer.nbytes, expert=task.expert, priority=task.priority.name,
                                         queued_s=task.queued_ns), "task": task})
        if task.chunked or task.landed == NUM_CHUNKS:  # unchunked: compute sees whole experts only
            entry.chunks_ready = task.landed
        if task.cancelled:
            if not task.on_link and (task.chunked or entry.ready):
                self._forget(task)
        elif entry.ready:
            entry.copying = False
            self.counters.copies[task.layer] += 1
            self._queues[task.priority].remove(task)
            del self._tasks[(task.layer, task.expert)]

    def _forget(self, task: CopyTask) -> None:
        self._queues[task.priority].remove(task)
        del self._tasks[(task.layer, task.expert)]
        if task.entry is not None:
            self.cache.remove(task.layer, task.expert)

    def take_counters(self) -> tuple[list[int], list[int], list[int], list[int], list[dict]]:
        """Copies, bytes, evictions and wasted bytes per layer since the last call, and the timeline rows
        of the chunks landed meanwhile, taken together so that they always agree. A row's `task` is its
        CopyTask, to read `dropped` from once the run is over (a task may be dropped later)."""
        landed, self._landed = self._landed, []
        now = (list(self.counters.copies), list(self.counters.bytes), list(self.cache.evictions),
               list(self.cache.wasted_bytes))
        since = [[b - a for a, b in zip(before, after, strict=True)]
                 for before, after in zip(self._taken, now, strict=True)]
        self._taken = now
        return (*since, landed)

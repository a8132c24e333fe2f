"""The copy engine with real tensors on the CPU: what lands where, in which order, and that it never hangs.

Ordering tests hold the worker on a chunk with a scripted link and release it explicitly; nothing here
sleeps for ordering. Every blocking wait has a timeout so a regression fails instead of hanging.
"""

import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from promoe_bench.cache import NUM_CHUNKS, ExpertCache
from promoe_bench.copy_engine import DEPTH, CopyEngine, Priority
from promoe_bench.expert_store import ExpertLayout, ExpertStore
from promoe_bench.links import EmulatedLink, Transfer
from promoe_bench.policies import LRU
from promoe_bench.slot_pool import SlotPool

HIGH, LOW = Priority.HIGH, Priority.LOW
TIMEOUT = 5.0
LAYOUT = ExpertLayout(hidden=4, intermediate=6, transposed=False, has_bias=False, dtype=torch.float32)


def code_of(layer, expert, chunk):
    return (1000 * layer + 10 * expert + chunk) * 100


def identity(chunk_values: torch.Tensor) -> tuple[int, int, int]:
    """(layer, expert, chunk) of a chunk of the store, from its first value."""
    code = int(chunk_values[0].item()) // 100
    return code // 1000, code // 10 % 100, code % 10


class ScriptedLink:
    """Copies for real and records (layer, expert, chunk) in the order chunks were put on the link.

    While `held`, the worker, on each chunk it waits for, announces it and waits for a permit, so a
    test can keep the chunk on the link, change the queues, then let it land."""

    device_waits = False

    def __init__(self, held=False):
        self.log = []
        self.held = held
        self.landing = None  # the chunk the worker waits for now
        self._arrived = threading.Semaphore(0)
        self._permits = threading.Semaphore(0)

    def issue(self, dst, src, after=None):
        self.log.append(identity(src))
        return Transfer(None, time.perf_counter_ns(), None, src.numel() * src.element_size(), (dst, src))

    def complete(self, transfer):
        dst, src = transfer.pending
        if self.held:
            self.landing = identity(src)
            self._arrived.release()
            if not self._permits.acquire(timeout=TIMEOUT):
                raise TimeoutError("test never let the held chunk through")
        dst.copy_(src)
        return Transfer(None, transfer.start, time.perf_counter_ns(), transfer.nbytes)

    def next_held(self) -> tuple[int, int, int]:
        """Wait until the worker is held on a chunk; that chunk."""
        assert self._arrived.acquire(timeout=TIMEOUT), "the worker never reached the link"
        return self.landing

    def let_one_through(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self.held = False
        self._permits.release()  # the chunk held now, if any

    def copied(self, layer, expert) -> list[int]:
        return [c for (ly, e, c) in self.log if (ly, e) == (layer, expert)]


class FailingLink:
    """A link that goes down while the first chunk is on it."""

    device_waits = False

    def issue(self, dst, src, after=None):
        return Transfer(None, 0, None, src.numel() * src.element_size())

    def complete(self, transfer):
        raise OSError("link went down")


def make_store(num_layers, num_experts):
    store = ExpertStore(LAYOUT, num_layers, num_experts, pin=False)
    for layer in range(num_layers):
        buffer = store.allocate_layer(layer)
        for expert in range(num_experts):
            for chunk in range(NUM_CHUNKS):
                start, end = LAYOUT.chunk_bounds(chunk)
                # Every value distinct and exact in float32; the first names the chunk.
                buffer[expert, start:end] = code_of(layer, expert, chunk) + torch.arange(end - start)
    return store


@pytest.fixture
def make_engine():
    """make_engine(link, num_layers=2, num_experts=8, capacity=2, cache_cls=ExpertCache, depth=1) -> namespace;
    closed at teardown. One chunk on the link at a time by default: the scheduling tests assert the exact
    order chunks go on the link, which a queue ahead would shift by a chunk; the queue's own tests and
    the stress tests run at the engine's DEPTH."""
    made = []

    def make(link, num_layers=2, num_experts=8, capacity=2, cache_cls=ExpertCache, depth=1):
        store = make_store(num_layers, num_experts)
        pool = SlotPool(num_layers * capacity, LAYOUT, torch.device("cpu"))
        chunk_bytes = tuple(LAYOUT.chunk_numel(c) * LAYOUT.dtype.itemsize for c in range(3))
        cache = cache_cls(num_layers, capacity, LRU(num_layers), chunk_bytes)
        engine = CopyEngine(store, pool, cache, link, depth=depth)
        made.append((engine, link))
        return SimpleNamespace(store=store, pool=pool, cache=cache, engine=engine, link=link)

    yield make
    for engine, link in made:
        if isinstance(link, ScriptedLink):
            link.open()  # a worker held on the link could not see close()
        engine.close()


def in_thread(fn, *args):
    """Run fn in a thread; returns (thread, outcome) where outcome gets 'value' or 'error'."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 -- handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def finish(thread):
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "deadlock: the call never returned"


def holds_expert(t, layer, expert) -> bool:
    entry = t.cache.lookup(layer, expert)
    return entry is not None and entry.ready and torch.equal(t.pool.buffer[entry.slot], t.store.expert(layer, expert))


def call(fn, *args):
    """fn(*args), failing the test instead of hanging if it never returns."""
    thread, outcome = in_thread(fn, *args)
    finish(thread)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def idle(t):
    call(t.engine.idle)


# -- landing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_requested_expert_lands_in_its_slot_with_the_stores_bytes(make_engine, chunked):
    t = make_engine(ScriptedLink())
    t.engine.request(1, 5, HIGH, chunked=chunked)
    idle(t)
    entry = t.cache.lookup(1, 5)
    assert entry.ready and not entry.copying
    assert torch.equal(t.pool.buffer[entry.slot], t.store.expert(1, 5))
    for (weight, _), (expected, _) in zip(
        t.pool.views(entry.slot), LAYOUT.chunk_views(t.store.expert(1, 5)), strict=True
    ):
        assert torch.equal(weight, expected)
    assert t.link.log == [(1, 5, 0), (1, 5, 1), (1, 5, 2)]
    assert t.engine.counters.copies == [0, 1]
    assert t.engine.counters.bytes == [0, LAYOUT.nbytes]


def test_chunks_land_one_at_a_time_and_wait_returns_after_the_ones_asked_for(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.begin_forward(0, [3])
    t.engine.request(0, 3, HIGH)
    assert t.link.next_held() == (0, 3, 0)
    thread, outcome = in_thread(t.engine.wait, 0, 3, 2)
    t.link.let_one_through()
    assert t.link.next_held() == (0, 3, 1)
    assert thread.is_alive()  # one chunk is not enough
    t.link.let_one_through()
    finish(thread)
    entry, landed = outcome["value"]
    assert not landed and entry.chunks_ready >= 2
    t.link.open()
    idle(t)
    t.engine.release(0, 3)
    assert holds_expert(t, 0, 3)


# -- priorities ------------------------------------------------------------------------------------


def test_high_task_waits_at_most_one_chunk_behind_low(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(0, 2, LOW)
    t.engine.request(1, 3, LOW)
    t.engine.request(1, 4, HIGH)
    t.link.open()
    idle(t)
    assert t.link.log[:4] == [(0, 1, 0), (1, 4, 0), (1, 4, 1), (1, 4, 2)]
    # Then the LOW tasks, the partly copied one resuming where it stopped.
    assert sorted(t.link.log[4:]) == sorted(
        [(0, 1, 1), (0, 1, 2)] + [(0, 2, c) for c in range(3)] + [(1, 3, c) for c in range(3)]
    )
    assert all(holds_expert(t, ly, e) for ly, e in [(0, 1), (0, 2), (1, 3), (1, 4)])


def test_high_tasks_run_in_request_order(make_engine):
    t = make_engine(ScriptedLink(held=True), capacity=3)
    t.engine.request(0, 1, HIGH)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(1, 6, HIGH)
    t.engine.request(0, 2, HIGH)
    t.link.open()
    idle(t)
    assert [(ly, e) for ly, e, _ in t.link.log] == [(0, 1)] * 3 + [(1, 6)] * 3 + [(0, 2)] * 3


def test_high_request_promotes_a_queued_low_task_copied_once(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(1, 1, LOW)
    assert t.link.next_held() == (1, 1, 0)
    t.engine.request(0, 2, LOW)
    t.engine.request(0, 3, LOW)
    t.engine.request(0, 3, HIGH)
    t.link.open()
    idle(t)
    assert t.link.log[1:4] == [(0, 3, 0), (0, 3, 1), (0, 3, 2)]
    assert t.link.copied(0, 3) == [0, 1, 2]
    assert t.engine.counters.copies == [2, 1]
    assert holds_expert(t, 0, 3)


def test_high_request_of_a_partly_copied_low_task_keeps_its_chunks(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(1, 2, HIGH)
    t.link.let_one_through()
    assert t.link.next_held() == (1, 2, 0)  # 1 is now partly copied and waiting
    t.engine.request(0, 1, HIGH)
    t.link.open()
    idle(t)
    assert t.link.copied(0, 1) == [0, 1, 2]
    assert holds_expert(t, 0, 1)


def test_repeated_requests_do_not_copy_twice(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(0, 1, HIGH)
    assert t.link.next_held() == (0, 1, 0)
    for priority in (HIGH, LOW, HIGH):
        t.engine.request(0, 1, priority)
    t.link.open()
    idle(t)
    t.engine.request(0, 1, HIGH)  # resident now
    idle(t)
    assert t.link.copied(0, 1) == [0, 1, 2]
    assert t.engine.counters.copies == [1, 0]


# -- drop_low --------------------------------------------------------------------------------------


def test_drop_low_forgets_the_layers_queued_low_tasks_only(make_engine):
    t = make_engine(ScriptedLink(held=True), capacity=3)
    t.engine.request(1, 7, HIGH)
    assert t.link.next_held() == (1, 7, 0)
    t.engine.request(0, 2, LOW)
    t.engine.request(1, 3, LOW)
    t.engine.request(0, 4, LOW)
    t.engine.request(0, 5, HIGH)
    assert t.engine.drop_low(0) == 2
    t.link.open()
    idle(t)
    for expert in (2, 4):
        assert t.link.copied(0, expert) == []
        assert t.cache.lookup(0, expert) is None
    assert holds_expert(t, 1, 3)
    assert holds_expert(t, 0, 5)  # HIGH tasks of the layer are kept
    assert t.engine.counters.dropped == 2


def test_drop_low_of_the_chunk_on_the_link_gives_its_slot_back(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(0, 2, LOW)
    assert t.engine.drop_low(0) == 2
    assert t.engine.drop_low(0) == 0  # already dropped: not counted twice
    t.link.open()
    idle(t)
    assert t.link.copied(0, 1) == [0]
    assert t.cache.residents(0) == []
    # Both slots are free again: two new experts fit without evicting anything.
    t.engine.request(0, 5, HIGH)
    t.engine.request(0, 6, HIGH)
    idle(t)
    assert holds_expert(t, 0, 5) and holds_expert(t, 0, 6)
    assert t.cache.evictions == [0, 0]


def partly_copied_low(make_engine):
    """One slot per layer; (0, 1) requested LOW with one chunk landed, then the worker held on the first
    chunk of (1, 2), requested HIGH."""
    t = make_engine(ScriptedLink(held=True), capacity=1)
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(1, 2, HIGH)
    t.link.let_one_through()
    assert t.link.next_held() == (1, 2, 0)
    return t


def test_drop_low_of_a_partly_copied_waiting_task_gives_its_slot_back(make_engine):
    t = partly_copied_low(make_engine)
    assert t.cache.lookup(0, 1).chunks_ready == 1  # partly copied, not on the link
    assert t.engine.drop_low(0) == 1
    assert t.cache.lookup(0, 1) is None
    t.link.open()
    idle(t)
    assert t.link.copied(0, 1) == [0]
    t.engine.request(0, 3, HIGH)  # the only slot of layer 0 is free again
    idle(t)
    assert holds_expert(t, 0, 3)
    assert t.cache.evictions == [0, 0]


def test_landed_chunks_are_reported_once_with_their_bytes_and_whether_their_task_was_dropped(make_engine):
    t = partly_copied_low(make_engine)
    t.engine.drop_low(0)  # (0, 1) had one chunk landed: it was copied, then dropped
    t.link.open()
    idle(t)
    copies, nbytes, _, _, landed = t.engine.take_counters()
    assert [(row["layer"], row["expert"], row["priority"]) for row in landed] == [(0, 1, "LOW")] + [(1, 2, "HIGH")] * 3
    assert [row["task"].dropped for row in landed] == [True, False, False, False]
    assert sum(row["bytes"] for row in landed) == sum(nbytes) == 4 * t.cache.chunk_bytes[0]
    assert all(row["queued_s"] <= row["start_s"] <= row["end_s"] for row in landed)
    assert copies == [0, 1]
    assert t.engine.take_counters()[-1] == []  # each chunk is reported once


def test_a_dropped_expert_requested_again_is_copied(make_engine):
    t = make_engine(ScriptedLink(held=True))
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.drop_low(0)
    t.engine.request(0, 1, LOW)  # while its first chunk is still on the link
    t.link.open()
    idle(t)
    assert holds_expert(t, 0, 1)
    assert t.link.copied(0, 1) == [0, 1, 2]


# -- residency, eviction, access -----------------------------------------------------------------


def compute(t, layer, experts):
    """One forward of `layer` as the runtime does it: order, wait for each, release."""
    t.engine.begin_forward(layer, experts)
    for expert in experts:
        call(t.engine.wait, layer, expert, NUM_CHUNKS)
        assert holds_expert(t, layer, expert)
        t.engine.release(layer, expert)


def test_low_request_of_a_resident_expert_copies_nothing_and_counts_as_an_access(make_engine):
    t = make_engine(ScriptedLink())
    compute(t, 0, [1, 2])  # LRU order: 1, then 2
    copied = len(t.link.log)
    t.engine.request(0, 1, LOW)  # 1 becomes the most recently used
    idle(t)
    assert len(t.link.log) == copied
    t.engine.request(0, 3, HIGH)
    idle(t)
    assert t.cache.lookup(0, 2) is None
    assert holds_expert(t, 0, 1) and holds_expert(t, 0, 3)


def test_high_request_of_a_resident_expert_is_not_an_access(make_engine):
    t = make_engine(ScriptedLink())
    compute(t, 0, [1, 2])
    t.engine.request(0, 1, HIGH)
    t.engine.request(0, 3, HIGH)
    idle(t)
    assert t.cache.lookup(0, 1) is None
    assert len(t.link.log) == 3 * NUM_CHUNKS


def test_evict_frees_a_resident_slot_but_not_one_in_use(make_engine):
    t = make_engine(ScriptedLink())
    compute(t, 0, [1, 2])
    t.engine.begin_forward(0, [2])
    call(t.engine.wait, 0, 2, NUM_CHUNKS)
    t.engine.evict(0, 2)  # in use: ignored
    t.engine.evict(0, 1)
    assert t.cache.residents(0) == [2]
    assert t.cache.evictions == [1, 0]
    t.engine.release(0, 2)


class SignallingCache(ExpertCache):
    """Sets `refused` when a claim finds no slot (the worker then sleeps without dropping the lock)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.refused = threading.Event()

    def claim(self, layer, expert, last_resort, prefetch=False):
        entry = super().claim(layer, expert, last_resort, prefetch)
        if entry is None:
            self.refused.set()
        return entry


def test_evict_wakes_a_task_waiting_for_a_slot(make_engine):
    t = make_engine(ScriptedLink(), num_layers=1, capacity=2, cache_cls=SignallingCache)
    t.engine.request(0, 1, HIGH)
    t.engine.request(0, 2, HIGH)
    idle(t)
    t.engine.begin_forward(0, [1, 2])
    t.engine.request(0, 5, HIGH)  # no slot while 1 and 2 are pending
    assert t.cache.refused.wait(TIMEOUT)
    t.engine.evict(0, 2)  # evict ignores pending: a slot is free now
    thread, _ = in_thread(t.engine.idle)
    thread.join(1.0)
    assert not thread.is_alive(), "5 waits for a slot that is already free"


def test_wait_requests_an_expert_nobody_asked_for(make_engine):
    t = make_engine(ScriptedLink())
    t.engine.begin_forward(1, [4])
    entry, landed = call(t.engine.wait, 1, 4, NUM_CHUNKS)
    assert not landed and entry.ready
    assert t.engine.counters.refetches == 1
    assert holds_expert(t, 1, 4)
    t.engine.release(1, 4)


def test_wait_on_a_ready_expert_does_not_stall(make_engine):
    t = make_engine(ScriptedLink())
    t.engine.request(0, 2, HIGH)
    idle(t)
    t.engine.begin_forward(0, [2])
    entry, landed = call(t.engine.wait, 0, 2, NUM_CHUNKS)
    assert landed and entry is t.cache.lookup(0, 2)
    t.engine.release(0, 2)
    assert t.engine.counters.refetches == 0
    assert (0, 2) not in t.cache.in_use


def test_wait_takes_a_pending_slot_as_last_resort_for_the_expert_compute_needs(make_engine):
    t = make_engine(ScriptedLink(), num_layers=1, capacity=2)
    compute(t, 0, [1, 2])
    refetches, evictions = t.engine.counters.refetches, t.cache.evictions[0]
    # Three routed experts, two slots: 3 runs first and must take the slot of 2, which runs last.
    t.engine.begin_forward(0, [3, 1, 2])
    t.engine.request(0, 3, HIGH)
    for expert in (3, 1, 2):
        call(t.engine.wait, 0, expert, NUM_CHUNKS)
        assert holds_expert(t, 0, expert)
        t.engine.release(0, expert)
    assert t.engine.counters.refetches == refetches + 1  # 2 was copied again after giving way
    assert t.cache.evictions[0] == evictions + 2


# A HIGH task that cannot claim a slot must not hold up the tasks behind it: only the task compute awaits
# may evict a pending expert, and it may be queued behind. (Both tests deadlocked at commit 75ebc38.)


def wait_briefly(t, layer, expert):
    thread, outcome = in_thread(t.engine.wait, layer, expert, NUM_CHUNKS)
    thread.join(1.0)  # a correct engine answers in milliseconds
    return not thread.is_alive()


def test_compute_waiting_behind_a_blocked_high_task_gets_its_last_resort_slot(make_engine):
    t = make_engine(ScriptedLink(), num_layers=1, capacity=2)
    t.engine.request(0, 0, HIGH)
    t.engine.request(0, 1, HIGH)
    idle(t)
    t.engine.begin_forward(0, [3, 2, 0, 1])  # four routed experts, two slots; 3 runs first...
    t.engine.request(0, 2, HIGH)  # ...but 2 was requested first
    t.engine.request(0, 3, HIGH)
    assert wait_briefly(t, 0, 3), "deadlock: 3 never got a slot"
    assert holds_expert(t, 0, 3)
    assert t.cache.lookup(0, 1) is None  # the pending expert that runs last gave way


def test_promoted_partly_copied_expert_is_not_stuck_behind_a_blocked_high_task(make_engine):
    t = make_engine(ScriptedLink(held=True), num_layers=1, capacity=2)
    t.engine.request(0, 1, HIGH)
    for _ in range(NUM_CHUNKS):
        t.link.next_held()
        t.link.let_one_through()
    t.engine.request(0, 2, LOW)
    assert t.link.next_held() == (0, 2, 0)
    t.engine.begin_forward(0, [2, 1])  # no more routed experts than slots
    t.engine.request(0, 5, HIGH)  # no slot while 1 is pending and 2 is copying
    t.engine.request(0, 2, HIGH)  # promotes 2, now behind 5
    t.link.open()
    assert wait_briefly(t, 0, 2), "deadlock: 2 keeps its slot but is never copied further"
    assert holds_expert(t, 0, 2)
    assert t.link.copied(0, 2) == [0, 1, 2]


# -- the link's queue (the engine's DEPTH) ---------------------------------------------------------


class DeviceLink(ScriptedLink):
    """A scripted link whose compute waits on the device, as CUDA's does: it may go on once a chunk is
    issued, queued behind its event."""

    device_waits = True


def test_a_chunk_is_queued_behind_the_one_on_the_link_so_the_link_never_waits_for_the_worker(make_engine):
    t = make_engine(ScriptedLink(held=True), depth=DEPTH)
    t.engine.request(0, 1, LOW)
    assert t.link.next_held() == (0, 1, 0)
    assert t.link.log == [(0, 1, 0), (0, 1, 1)]  # the second chunk was issued before the first landed
    t.link.let_one_through()
    assert t.link.next_held() == (0, 1, 1)
    assert t.link.log == [(0, 1, 0), (0, 1, 1), (0, 1, 2)]  # and the third as soon as the first landed
    t.link.open()
    idle(t)
    assert holds_expert(t, 0, 1)


def test_a_high_task_waits_behind_at_most_the_chunks_already_on_the_link(make_engine):
    t = make_engine(ScriptedLink(held=True), depth=DEPTH)
    t.engine.request(0, 1, LOW)
    t.engine.request(0, 2, LOW)
    assert t.link.next_held() == (0, 1, 0)
    t.engine.request(1, 4, HIGH)
    t.link.open()
    idle(t)
    assert t.link.log[:DEPTH + 3] == [(0, 1, 0), (0, 1, 1), (1, 4, 0), (1, 4, 1), (1, 4, 2)]
    assert all(holds_expert(t, ly, e) for ly, e in [(0, 1), (0, 2), (1, 4)])


def test_compute_on_a_device_goes_on_once_the_chunks_are_issued_behind_their_events(make_engine):
    t = make_engine(DeviceLink(held=True), depth=DEPTH)
    t.engine.begin_forward(0, [3])
    t.engine.request(0, 3, HIGH)
    assert t.link.next_held() == (0, 3, 0)
    entry, landed = call(t.engine.wait, 0, 3, 2)  # chunks 0 and 1 are on the link: no host wait
    assert not landed and entry.chunks_ready == 0
    assert [identity(event.pending[1]) for event in entry.events] == [(0, 3, 0), (0, 3, 1)]
    thread, outcome = in_thread(t.engine.wait, 0, 3, 3)
    thread.join(0.2)
    assert thread.is_alive(), "the third chunk is not on the link yet: the link holds two"
    t.link.let_one_through()
    finish(thread)
    entry, landed = outcome["value"]
    assert not landed and identity(entry.events[2].pending[1]) == (0, 3, 2)
    t.link.open()
    t.engine.release(0, 3)
    idle(t)
    assert holds_expert(t, 0, 3)


def test_an_unchunked_expert_is_shown_to_compute_on_a_device_as_one_whole(make_engine):
    t = make_engine(DeviceLink(held=True), depth=DEPTH)
    t.engine.begin_forward(0, [3])
    t.engine.request(0, 3, HIGH, chunked=False)
    assert t.link.next_held() == (0, 3, 0)
    thread, outcome = in_thread(t.engine.wait, 0, 3, 2)
    thread.join(0.2)
    assert thread.is_alive(), "two of its chunks on the link are not the whole expert"
    t.link.let_one_through()
    finish(thread)
    entry, _ = outcome["value"]
    assert [identity(event.pending[1]) for event in entry.events] == [(0, 3, 2)] * 3  # all wait for the last
    t.link.open()
    t.engine.release(0, 3)
    idle(t)


def test_close_lets_the_chunks_on_the_link_land_first(make_engine):
    t = make_engine(ScriptedLink(held=True), depth=DEPTH)
    t.engine.request(0, 1, HIGH)
    assert t.link.next_held() == (0, 1, 0)
    thread, _ = in_thread(t.engine.close)
    thread.join(0.2)
    assert thread.is_alive(), "a slot's memory must outlive the copy into it"
    t.link.open()
    t.link.let_one_through()  # the second chunk already on the link
    finish(thread)
    assert t.cache.lookup(0, 1).chunks_ready == 2  # the third was never issued


# -- failures -------------------------------------------------------------------------------------


def test_worker_failure_surfaces_in_wait_instead_of_hanging(make_engine):
    t = make_engine(FailingLink())
    t.engine.begin_forward(0, [1])
    with pytest.raises(RuntimeError) as raised:
        call(t.engine.wait, 0, 1, 1)
    assert isinstance(raised.value.__cause__, OSError)


def test_worker_failure_surfaces_in_idle(make_engine):
    t = make_engine(FailingLink())
    t.engine.request(0, 1, LOW)
    with pytest.raises(RuntimeError):
        call(t.engine.idle)


def test_close_stops_an_idle_worker(make_engine):
    t = make_engine(ScriptedLink())
    call(t.engine.close)
    assert not t.engine._worker.is_alive()


# -- stress ---------------------------------------------------------------------------------------


def run_with_watchdog(fn, timeout):
    thread, outcome = in_thread(fn)
    thread.join(timeout)
    assert not thread.is_alive(), "deadlock: the stress loop did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# With random HIGH requests, HIGH tasks are often queued in another order than compute needs them, and
# with more routed experts than slots, pending experts must give way as a last resort.
@pytest.mark.parametrize(
    "random_high,extra_routed,capacity,link_kind,seed",
    [
        (True, 0, 2, "emulated", 0),
        (True, 2, 3, "scripted", 1),
        (False, 2, 2, "emulated", 2),
        (True, 1, 2, "scripted", 3),
    ],
)
def test_stress_random_requests_drops_and_forwards(make_engine, random_high, extra_routed, capacity, link_kind, seed):
    num_layers, num_experts = 3, 8
    link = EmulatedLink(gbps=1000, latency_us=0) if link_kind == "emulated" else ScriptedLink()
    t = make_engine(link, num_layers=num_layers, num_experts=num_experts, capacity=capacity, depth=DEPTH)
    rng = random.Random(seed)
    gate_up_end = LAYOUT.chunk_bounds(1)[1]

    def check_capacity():
        for layer in range(num_layers):
            assert len(t.cache.residents(layer)) <= capacity

    def loop():
        forwards = waits = 0
        for _ in range(3000):
            op = rng.random()
            layer, expert = rng.randrange(num_layers), rng.randrange(num_experts)
            if op < 0.35:
                priority = rng.choice([HIGH, LOW]) if random_high else LOW
                t.engine.request(layer, expert, priority, chunked=rng.random() < 0.8)
            elif op < 0.45:
                t.engine.drop_low(layer)
            elif op < 0.5:
                t.engine.evict(layer, expert)
            else:
                order = rng.sample(range(num_experts), rng.randint(1, capacity + extra_routed))
                t.engine.begin_forward(layer, order)
                if rng.random() < 0.5:  # else wait() requests what is missing
                    for e in order:
                        t.engine.request(layer, e, HIGH)
                for e in order:
                    entry, _ = t.engine.wait(layer, e, 2)
                    assert torch.equal(t.pool.buffer[entry.slot, :gate_up_end], t.store.expert(layer, e)[:gate_up_end])
                    entry, _ = t.engine.wait(layer, e, NUM_CHUNKS)
                    assert torch.equal(t.pool.buffer[entry.slot], t.store.expert(layer, e))
                    check_capacity()
                    t.engine.release(layer, e)
                    waits += 1
                forwards += 1
            check_capacity()
        t.engine.idle()
        return forwards, waits

    forwards, waits = run_with_watchdog(loop, timeout=20)
    assert forwards > 1000 and waits > forwards
    assert sum(t.engine.counters.copies) > 500
    assert sum(t.cache.evictions) > 100
    for layer in range(num_layers):
        for expert in t.cache.residents(layer):
            assert holds_expert(t, layer, expert)

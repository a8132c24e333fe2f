"""ProMoE (and the other prefetching strategies) driving the real copy engine and expert cache.

The deterministic tests hold the copy worker on a chunk with the scripted link of test_copy_engine and
step it chunk by chunk; the stress test runs thousands of fake forwards on a fast link. Strategies talk
to the engine through a small Environment adapter, as the runtime's OffloadRuntime does.
"""

import random
import threading
from types import SimpleNamespace

import pytest
import torch

from promoe_bench.cache import NUM_CHUNKS, ExpertCache
from promoe_bench.copy_engine import CopyEngine, Priority
from promoe_bench.environment import ModelShape
from promoe_bench.links import EmulatedLink
from promoe_bench.policies import LRU
from promoe_bench.slot_pool import SlotPool
from promoe_bench.strategies import parse
from promoe_bench.strategies.promoe import ProMoE
from promoe_bench.trace import RoutingTrace
from tests import test_copy_engine
from tests.test_copy_engine import LAYOUT, ScriptedLink, call, holds_expert, make_store

make_engine = test_copy_engine.make_engine  # the fixture: a CopyEngine over a real cache, closed at teardown

HIGH, LOW = Priority.HIGH, Priority.LOW
CHUNK_BYTES = tuple(LAYOUT.chunk_numel(c) * LAYOUT.dtype.itemsize for c in range(NUM_CHUNKS))
GATE_UP_END = LAYOUT.chunk_bounds(1)[1]


class EngineEnv:
    """The Environment over a real CopyEngine / ExpertCache (what OffloadRuntime forwards), with
    scripted or random predictions."""

    def __init__(self, t, top_k=2, trace=None, predict=None):
        self.t = t
        self.shape = ModelShape(t.store.num_layers, t.store.num_experts, top_k, LAYOUT.nbytes, t.cache.capacity)
        self.trace = trace
        self.predictions: dict[tuple[int, int], list[int]] = {}
        self._predict = predict
        self.positions = [0] * t.store.num_layers

    def is_resident(self, layer, expert):
        return self.chunks_ready(layer, expert) == NUM_CHUNKS

    def chunks_ready(self, layer, expert):
        entry = self.t.cache.lookup(layer, expert)
        return entry.chunks_ready if entry is not None else 0

    def request(self, layer, expert, priority, chunked=True):
        self.t.engine.request(layer, expert, priority, chunked)

    def drop_pending(self, layer):
        return self.t.engine.drop_low(layer)

    def evict(self, layer, expert):
        self.t.engine.evict(layer, expert)

    def predict(self, layer, target, predictor, min_prob=0.0, recall=1.0):
        if self._predict is not None:
            return self._predict(layer, target, predictor, min_prob)
        return list(self.predictions.get((layer, target), []))

    def position(self, layer):
        return self.positions[layer]


def compute(t, layer, order):
    """The runtime's part of a forward of `layer` once the order is known: wait, check, release."""
    t.engine.begin_forward(layer, order)
    for expert in order:
        entry, _ = call(t.engine.wait, layer, expert, 2)
        assert torch.equal(t.pool.buffer[entry.slot, :GATE_UP_END], t.store.expert(layer, expert)[:GATE_UP_END])
        entry, _ = call(t.engine.wait, layer, expert, NUM_CHUNKS)
        assert torch.equal(t.pool.buffer[entry.slot], t.store.expert(layer, expert))
        t.engine.release(layer, expert)
    call(t.engine.idle)


def copies(link, start=0):
    """(layer, expert) of each chunk the link started, from log index `start`."""
    return [(ly, e) for ly, e, _ in link.log[start:]]


# -- preemption on the real engine (chunked) -----------------------------------------------------------

# Layer 1 of a two-layer model; a, b, c are predicted, the router chooses others.
A, B, C, D, E = 1, 2, 3, 4, 5


def prefetch_abc(make_engine, strategy, capacity=4):
    """Layer 0's input prefetches [a, b, c] of layer 1 LOW; the worker is held on a's first chunk."""
    t = make_engine(ScriptedLink(held=True), num_layers=2, capacity=capacity)
    env = EngineEnv(t)
    env.predictions = {(0, 1): [A, B, C]}
    strategy.on_layer_input(env, 0)
    assert t.link.next_held() == (1, A, 0)
    assert [task.expert for task in t.engine.scheduler._queues[LOW]] == [A, B, C]
    return t, env


def test_router_preempts_prefetches_and_the_high_copy_goes_next(make_engine):
    strategy = ProMoE()
    t, env = prefetch_abc(make_engine, strategy)
    order = strategy.on_router(env, 1, [B, D])
    assert order == [B, D]  # neither has a chunk: routing order
    assert t.engine.counters.dropped == 2  # a and c; b was chosen, so promoted before the drop
    t.link.let_one_through()  # a's first chunk lands, then a is forgotten
    assert t.link.next_held()[:2] == (1, B), "a HIGH copy must follow the chunk on the link"
    assert t.engine.scheduler._tasks[(1, B)].priority is HIGH
    t.link.open()
    compute(t, 1, order)
    assert t.link.log == [(1, A, 0)] + [(1, B, c) for c in range(3)] + [(1, D, c) for c in range(3)]
    assert t.link.copied(1, C) == []  # dropped before it started
    assert t.link.copied(1, A) == [0]  # dropped on the link: never copied further
    assert t.cache.lookup(1, A) is None and t.cache.lookup(1, C) is None
    assert holds_expert(t, 1, B) and holds_expert(t, 1, D)
    assert t.cache.wasted_bytes == [0, CHUNK_BYTES[0]]  # a's landed chunk, never used


def test_high_copies_follow_the_reordered_execution_order(make_engine):
    strategy = ProMoE()
    t, env = prefetch_abc(make_engine, strategy)
    t.link.let_one_through()
    assert t.link.next_held() == (1, A, 1)  # a has one chunk landed, its second on the link
    order = strategy.on_router(env, 1, [D, C, A])
    # a has the most chunks (the one on the link keeps it alive): first; then routing order
    assert order == [A, D, C]
    t.link.let_one_through()
    assert t.link.next_held() == (1, A, 2), "a, promoted, resumes where it stopped"
    t.link.open()
    compute(t, 1, order)
    assert t.link.copied(1, A) == [0, 1, 2]  # kept its landed chunks: nothing copied twice
    assert copies(t.link, 3) == [(1, D)] * 3 + [(1, C)] * 3  # HIGH copies in execution order
    assert t.link.copied(1, B) == []
    assert t.cache.wasted_bytes == [0, 0]


def test_resident_experts_run_first_and_are_not_copied(make_engine):
    strategy = ProMoE()
    t = make_engine(ScriptedLink(), num_layers=2, capacity=4)
    env = EngineEnv(t)
    compute(t, 1, strategy.on_router(env, 1, [E]))
    assert env.is_resident(1, E)
    start = len(t.link.log)
    t.link.held = True
    env.predictions = {(0, 1): [A, B]}
    strategy.on_layer_input(env, 0)
    assert t.link.next_held() == (1, A, 0)
    order = strategy.on_router(env, 1, [D, B, E])
    assert order == [E, D, B]
    t.link.open()
    compute(t, 1, order)
    assert copies(t.link, start) == [(1, A)] + [(1, D)] * 3 + [(1, B)] * 3
    assert t.link.copied(1, E) == [0, 1, 2]  # once, before


# A prefetched expert that the router does choose, partly copied but not on the link when the router
# fires (here: a HIGH copy of layer 0 took the link after a's first chunk). ProMoE says it runs "those
# with the most chunks landed" first, so its HIGH request must come before the layer's LOW tasks are dropped.
def test_a_chosen_partly_copied_prefetch_waiting_off_the_link_keeps_its_chunks(make_engine):
    strategy = ProMoE()
    t, env = prefetch_abc(make_engine, strategy)
    t.engine.request(0, 6, HIGH)  # e.g. layer 0's router
    t.link.let_one_through()
    assert t.link.next_held() == (0, 6, 0)
    assert env.chunks_ready(1, A) == 1  # a: one chunk landed, waiting behind the HIGH copy
    order = strategy.on_router(env, 1, [D, A])
    t.link.open()
    compute(t, 1, order)
    assert t.link.copied(1, A) == [0, 1, 2]  # fails: [0, 0, 1, 2]
    assert order == [A, D]  # fails: [D, A], a counted no chunk


# -- the same without chunking -------------------------------------------------------------------------


def test_unchunked_high_copy_starts_only_after_the_whole_low_expert(make_engine):
    strategy = ProMoE(chunked=False)
    t, env = prefetch_abc(make_engine, strategy)
    order = strategy.on_router(env, 1, [B, D])
    assert order == [B, D]
    t.link.let_one_through()
    assert t.link.next_held() == (1, A, 1), "an unchunked copy is not preempted between its chunks"
    assert env.chunks_ready(1, A) == 0  # compute sees whole experts only
    t.link.let_one_through()
    assert t.link.next_held() == (1, A, 2)
    assert env.chunks_ready(1, A) == 0
    t.link.let_one_through()
    assert t.link.next_held()[:2] == (1, B)
    assert t.cache.lookup(1, A) is None  # landed whole, then forgotten
    t.link.open()
    compute(t, 1, order)
    assert copies(t.link) == [(1, A)] * 3 + [(1, B)] * 3 + [(1, D)] * 3
    assert t.link.copied(1, C) == []
    assert t.cache.wasted_bytes == [0, sum(CHUNK_BYTES)]  # all of a landed, never used


def test_unchunked_chosen_prefetch_on_the_link_is_kept(make_engine):
    strategy = ProMoE(chunked=False)
    t, env = prefetch_abc(make_engine, strategy)
    order = strategy.on_router(env, 1, [D, A])
    assert order == [D, A]  # an unchunked copy shows no chunk until it is whole
    t.link.open()
    compute(t, 1, order)
    assert copies(t.link) == [(1, A)] * 3 + [(1, D)] * 3
    assert t.cache.wasted_bytes == [0, 0]


def test_without_preempt_the_prefetches_keep_going_after_the_high_copies(make_engine):
    strategy = ProMoE(preempt=False)
    t, env = prefetch_abc(make_engine, strategy, capacity=5)
    order = strategy.on_router(env, 1, [B, D])
    assert t.engine.counters.dropped == 0
    t.link.let_one_through()
    assert t.link.next_held() == (1, B, 0)  # b promoted to HIGH, ahead of a
    t.link.open()
    compute(t, 1, order)
    assert copies(t.link) == [(1, A)] + [(1, B)] * 3 + [(1, D)] * 3 + [(1, A)] * 2 + [(1, C)] * 3
    for expert in (A, B, C, D):
        assert holds_expert(t, 1, expert)


# -- wasted bytes --------------------------------------------------------------------------------------


def test_a_prefetched_expert_evicted_unused_wastes_its_bytes(make_engine):
    t = make_engine(ScriptedLink(), num_layers=2, capacity=2)
    t.engine.request(1, A, LOW)
    call(t.engine.idle)
    t.engine.evict(1, A)
    assert t.cache.wasted_bytes == [0, sum(CHUNK_BYTES)]
    # evicted by a miss (LRU victim) counts the same
    t.engine.request(0, B, LOW)
    call(t.engine.idle)
    t.engine.request(0, C, HIGH)
    call(t.engine.idle)
    t.engine.request(0, D, HIGH)
    call(t.engine.idle)
    assert t.cache.lookup(0, B) is None
    assert t.cache.wasted_bytes == [sum(CHUNK_BYTES), sum(CHUNK_BYTES)]


def test_a_prefetched_expert_that_was_used_wastes_nothing(make_engine):
    t = make_engine(ScriptedLink(), num_layers=2, capacity=2)
    t.engine.request(1, A, LOW)
    call(t.engine.idle)
    t.engine.begin_forward(1, [A])
    call(t.engine.wait, 1, A, NUM_CHUNKS)
    t.engine.release(1, A)
    t.engine.evict(1, A)
    assert t.cache.lookup(1, A) is None
    assert t.cache.wasted_bytes == [0, 0]


def test_an_expert_copied_high_wastes_nothing_when_evicted_unused(make_engine):
    t = make_engine(ScriptedLink(), num_layers=2, capacity=2)
    t.engine.request(1, A, HIGH)
    call(t.engine.idle)
    t.engine.evict(1, A)
    assert t.cache.wasted_bytes == [0, 0]


def test_a_dropped_partly_copied_prefetch_wastes_its_landed_chunks(make_engine):
    t = make_engine(ScriptedLink(held=True), num_layers=2, capacity=3)
    t.engine.request(1, A, LOW)
    t.engine.request(1, B, LOW)
    t.engine.request(1, C, LOW)
    assert t.link.next_held() == (1, A, 0)
    t.link.let_one_through()
    assert t.link.next_held() == (1, A, 1)
    t.engine.drop_low(1)  # a on the link with one chunk landed; b and c not started
    t.link.open()
    call(t.engine.idle)
    assert t.link.copied(1, A) == [0, 1]
    assert t.cache.wasted_bytes == [0, CHUNK_BYTES[0] + CHUNK_BYTES[1]]
    # a partly copied one waiting off the link: its one landed chunk
    t.link.held = True
    t.engine.request(0, A, LOW)
    assert t.link.next_held() == (0, A, 0)
    t.engine.request(1, D, HIGH)
    t.link.let_one_through()
    assert t.link.next_held() == (1, D, 0)
    t.engine.drop_low(0)
    assert t.cache.wasted_bytes == [CHUNK_BYTES[0], CHUNK_BYTES[0] + CHUNK_BYTES[1]]
    t.link.open()
    call(t.engine.idle)
    assert t.cache.wasted_bytes == [CHUNK_BYTES[0], CHUNK_BYTES[0] + CHUNK_BYTES[1]]


def test_promoe_preemption_counts_waste_by_landed_chunk(make_engine):
    strategy = ProMoE()
    t, env = prefetch_abc(make_engine, strategy)
    for chunk in (1, 2):
        t.link.let_one_through()
        assert t.link.next_held() == (1, A, chunk)
    assert strategy.on_router(env, 1, [D]) == [D]
    t.link.open()
    compute(t, 1, [D])
    # a was dropped with its last chunk on the link: it landed whole, was never used, and went
    assert t.cache.lookup(1, A) is None
    assert t.cache.wasted_bytes == [0, sum(CHUNK_BYTES)]


# -- stress: thousands of fake forwards under each strategy ------------------------------------------


class CheckedCache(ExpertCache):
    """Checks after every claim that the layer is within capacity and slots are its own and exclusive."""

    def __init__(self, *args):
        super().__init__(*args)
        self.claims = 0

    def claim(self, layer, expert, last_resort, prefetch=False):
        entry = super().claim(layer, expert, last_resort, prefetch)
        if entry is not None:
            self.claims += 1
            entries = self._entries[layer]
            assert len(entries) <= self.capacity, f"layer {layer} holds {len(entries)} > {self.capacity}"
            slots = [e.slot for e in entries.values()]
            assert len(set(slots)) == len(slots), "two experts share a slot"
            assert all(layer * self.capacity <= s < (layer + 1) * self.capacity for s in slots)
        return entry


@pytest.fixture
def make_strategy_engine():
    """(strategy, link, num_layers, num_experts, capacity, trace) -> namespace over a real engine whose
    cache uses the strategy's eviction policy; closed at teardown."""
    made = []

    def make(strategy, link, num_layers, num_experts, capacity, trace=None):
        store = make_store(num_layers, num_experts)
        pool = SlotPool(num_layers * capacity, LAYOUT, torch.device("cpu"))
        t = SimpleNamespace(store=store, pool=pool, link=link)
        t.cache = CheckedCache(num_layers, capacity, LRU(num_layers), CHUNK_BYTES)
        env = EngineEnv(t, trace=trace)
        t.cache.policy = strategy.eviction_policy(env)
        t.engine = CopyEngine(store, pool, t.cache, link)
        made.append(t.engine)
        return t, env

    yield make
    for engine in made:
        engine.close()


def run_with_watchdog(fn, timeout):
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 -- handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlock: the forward loop did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


STRESS = [
    # spec, capacity, routed per forward (min, max), link, seed, steps
    ("promoe", 3, (2, 2), "scripted", 0, 2000),
    ("promoe", 4, (1, 5), "emulated", 1, 1500),
    ("promoe[chunked=0]", 3, (1, 4), "scripted", 2, 1500),
    ("promoe[preempt=0]", 3, (2, 4), "scripted", 3, 1500),
    ("promoe[reorder=0]", 4, (2, 2), "emulated", 4, 1500),
    ("promoe[chunked=0,preempt=0,reorder=0]", 3, (2, 3), "scripted", 5, 1000),
    ("promoe[distance=1]", 3, (2, 3), "scripted", 6, 1000),
    ("skip_gate", 3, (2, 2), "scripted", 7, 1500),
    ("skip_gate[chunked=0]", 4, (1, 5), "emulated", 8, 1000),
    ("oracle", 3, (2, 3), "scripted", 9, 1500),
    ("static[spare=2]", 4, (2, 3), "scripted", 10, 1000),
]


@pytest.mark.parametrize("spec,capacity,routed,link_kind,seed,steps", STRESS)
def test_stress_strategy_forward_loop(make_strategy_engine, spec, capacity, routed, link_kind, seed, steps):
    num_layers, num_experts = 3, 8
    rng = random.Random(seed)
    strategy = parse(spec)
    # the workload's routing, fixed in advance so the oracle and static see the future they are told about
    forwards = [[tuple(rng.sample(range(num_experts), rng.randint(*routed))) for _ in range(97)]
                for _ in range(num_layers)]
    trace = RoutingTrace(forwards)
    link = EmulatedLink(gbps=1000, latency_us=0) if link_kind == "emulated" else ScriptedLink()
    t, env = make_strategy_engine(strategy, link, num_layers, num_experts, capacity, trace)

    def predict(layer, target, predictor, min_prob=0.0, recall=1.0):
        assert target > layer and predictor in strategy.predictors
        if predictor == "oracle":
            return list(trace.at(target, env.positions[target]))
        return rng.sample(range(num_experts), rng.randint(0, num_experts))

    env._predict = predict
    counts = {"waits": 0, "stalls": 0}

    def loop():
        strategy.setup(env)
        t.engine.idle()
        for _ in range(steps):
            for layer in range(num_layers):
                strategy.on_layer_input(env, layer)
                experts = list(trace.at(layer, env.positions[layer]))
                env.positions[layer] += 1
                order = strategy.on_router(env, layer, experts)
                assert sorted(order) == sorted(experts) and len(set(order)) == len(order)
                t.engine.begin_forward(layer, order)
                for expert in order:
                    entry, landed = t.engine.wait(layer, expert, 2)
                    assert torch.equal(t.pool.buffer[entry.slot, :GATE_UP_END],
                                       t.store.expert(layer, expert)[:GATE_UP_END]), "torn gate/up"
                    entry, landed_down = t.engine.wait(layer, expert, NUM_CHUNKS)
                    assert torch.equal(t.pool.buffer[entry.slot], t.store.expert(layer, expert)), "lost or torn copy"
                    assert t.cache.lookup(layer, expert) is entry
                    for ly in range(num_layers):
                        assert len(t.cache.residents(ly)) <= capacity
                    t.engine.release(layer, expert)
                    counts["waits"] += 1
                    counts["stalls"] += not (landed and landed_down)
                strategy.after_layer(env, layer, order)
        t.engine.idle()

    run_with_watchdog(loop, timeout=45)
    assert counts["waits"] >= steps * num_layers and counts["stalls"] > 0
    scheduler = t.engine.scheduler
    assert not scheduler.busy and not scheduler._queues[HIGH] and not scheduler._queues[LOW]
    assert scheduler.active is None
    assert t.cache.claims > 100 and sum(t.cache.evictions) > 50
    for layer in range(num_layers):
        for expert in t.cache.residents(layer):
            assert holds_expert(t, layer, expert)
        assert not t.cache._pending[layer]  # every routed expert was computed
    assert not t.cache.in_use
    if getattr(strategy, "preempt", False) and strategy.predictor != "oracle":  # perfect guesses drop nothing
        assert t.engine.counters.dropped > 0

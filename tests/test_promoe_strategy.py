"""The prefetching strategies as pure policy: what they ask of a scripted Environment, in which order.

No copies and no threads: the fake environment answers from a script and records every call that
changes something (request, drop_pending, evict) and every prediction asked for.
"""

import random

import pytest

from promoe_bench.environment import ModelShape, Priority
from promoe_bench.errors import UsageError
from promoe_bench.policies import LRU, Belady, Static
from promoe_bench.strategies import parse
from promoe_bench.strategies.oracle import Oracle
from promoe_bench.strategies.promoe import ProMoE
from promoe_bench.strategies.skip_gate import SkipGate
from promoe_bench.strategies.static import StaticCache
from promoe_bench.trace import RoutingTrace

HIGH, LOW = Priority.HIGH, Priority.LOW


class RecordingEnv:
    """An Environment with scripted state: `chunks[(layer, expert)]` landed chunks (3: resident),
    `predictions[(layer, target)]` what predict answers, `positions[layer]` what position answers."""

    def __init__(self, num_layers=4, num_experts=8, top_k=2, capacity=4, trace=None):
        self.shape = ModelShape(num_layers, num_experts, top_k, expert_bytes=1000, capacity=capacity)
        self.trace = trace
        self.chunks: dict[tuple[int, int], int] = {}
        self.predictions: dict[tuple[int, int], list[int]] = {}
        self.positions = [0] * num_layers
        self.calls: list[tuple] = []

    def is_resident(self, layer, expert):
        return self.chunks.get((layer, expert), 0) == 3

    def chunks_ready(self, layer, expert):
        return self.chunks.get((layer, expert), 0)

    def request(self, layer, expert, priority, chunked=True):
        self.calls.append(("request", layer, expert, priority, chunked))

    def drop_pending(self, layer):
        self.calls.append(("drop_pending", layer))
        return 0

    def evict(self, layer, expert):
        self.calls.append(("evict", layer, expert))

    def predict(self, layer, target, predictor, min_prob=0.0, recall=1.0):
        assert target > layer, "a strategy asked to predict a layer that is not ahead"
        self.calls.append(("predict", layer, target, predictor))
        return list(self.predictions.get((layer, target), []))

    def position(self, layer):
        return self.positions[layer]

    def requests(self):
        return [c[1:] for c in self.calls if c[0] == "request"]

    def predicted(self):
        return [c[1:] for c in self.calls if c[0] == "predict"]


def kinds(env):
    return [c[0] for c in env.calls]


# -- ProMoE on the router ---------------------------------------------------------------------------


def test_promoe_requests_the_missing_experts_high_then_drops_the_layers_remaining_low_requests():
    env = RecordingEnv()
    env.chunks = {(2, 5): 3, (1, 1): 3}  # 5 is resident in layer 2 (1 only in layer 1)
    order = ProMoE().on_router(env, 2, [1, 5, 6])
    # HIGH first: a chosen prefetch leaves the LOW queue (keeping its chunks) before the drop
    assert env.calls[:-1] == [("request", 2, 1, HIGH, True), ("request", 2, 6, HIGH, True)]
    assert env.calls[-1] == ("drop_pending", 2)
    assert order == [5, 1, 6]


def test_promoe_reorders_resident_first_then_most_chunks_ties_in_routing_order():
    env = RecordingEnv()
    env.chunks = {(1, 5): 0, (1, 1): 3, (1, 3): 2, (1, 7): 3, (1, 2): 2, (1, 4): 1, (0, 0): 3}
    routed = [5, 0, 1, 3, 4, 7, 2]
    order = ProMoE().on_router(env, 1, routed)
    assert order == [1, 7, 3, 2, 4, 5, 0]
    assert sorted(order) == sorted(routed) and len(set(order)) == len(order)
    # HIGH copies are requested in the order the experts will run
    assert env.requests() == [(1, e, HIGH, True) for e in (3, 2, 4, 5, 0)]


def test_promoe_returns_each_routed_expert_once_whatever_the_state():
    rng = random.Random(7)
    for _ in range(200):
        env = RecordingEnv()
        env.chunks = {(0, e): rng.randint(0, 3) for e in range(8)}
        routed = rng.sample(range(8), rng.randint(1, 8))
        for strategy in (ProMoE(), ProMoE(reorder=False), ProMoE(preempt=False), ProMoE(chunked=False)):
            order = strategy.on_router(env, 0, routed)
            assert sorted(order) == sorted(routed)
            ready = [env.chunks[(0, e)] for e in order]
            if strategy.reorder:
                assert ready == sorted(ready, reverse=True)
                for a, b in zip(order, order[1:], strict=False):  # equal readiness keeps routing order
                    if env.chunks[(0, a)] == env.chunks[(0, b)]:
                        assert routed.index(a) < routed.index(b)
            else:
                assert order == routed


def test_promoe_without_reorder_keeps_routing_order():
    env = RecordingEnv()
    env.chunks = {(1, 5): 0, (1, 1): 3, (1, 3): 2}
    order = ProMoE(reorder=False).on_router(env, 1, [5, 1, 3])
    assert order == [5, 1, 3]
    assert env.calls == [("request", 1, 5, HIGH, True), ("request", 1, 3, HIGH, True), ("drop_pending", 1)]


def test_promoe_without_preempt_never_drops():
    env = RecordingEnv()
    strategy = ProMoE(preempt=False)
    env.predictions = {(0, 1): [1, 2], (0, 2): [3, 4], (1, 3): [5]}
    for layer in range(4):
        strategy.on_layer_input(env, layer)
        strategy.on_router(env, layer, [0, 6])
        strategy.after_layer(env, layer, [0, 6])
    assert "drop_pending" not in kinds(env)
    assert "evict" not in kinds(env)


def test_promoe_unchunked_passes_chunked_false_to_every_request():
    env = RecordingEnv()
    env.chunks = {(1, 4): 2}
    strategy = ProMoE(chunked=False)
    env.predictions = {(0, 1): [1, 2], (0, 2): [3, 4], (1, 3): [5, 6]}
    for layer in range(4):
        strategy.on_layer_input(env, layer)
        strategy.on_router(env, layer, [4, 7])
    requests = env.requests()
    assert {r[2] for r in requests} == {HIGH, LOW}
    assert len(requests) == 3 * 2 + 4 * 2  # three prefetches of two, two misses per layer
    assert all(r[3] is False for r in requests)


def test_promoe_default_requests_are_chunked():
    env = RecordingEnv()
    env.predictions = {(0, 1): [1, 2]}
    strategy = ProMoE()
    strategy.on_layer_input(env, 0)
    strategy.on_router(env, 0, [3])
    assert env.requests() and all(r[3] is True for r in env.requests())


# -- prefetching at a layer's input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_layers,distance,expected",
    [
        (5, 2, {0: [1, 2], 1: [3], 2: [4], 3: [], 4: []}),
        (5, 1, {0: [1], 1: [2], 2: [3], 3: [4], 4: []}),
        (5, 3, {0: [1, 2, 3], 1: [4], 2: [], 3: [], 4: []}),
        (5, 9, {0: [1, 2, 3, 4], 1: [], 2: [], 3: [], 4: []}),  # clamped to num_layers - 1
        (3, 2, {0: [1, 2], 1: [], 2: []}),
        (2, 2, {0: [1], 1: []}),
        (1, 2, {0: []}),
    ],
)
def test_prefetch_targets(num_layers, distance, expected):
    strategy = ProMoE(distance=distance)
    for layer, targets in expected.items():
        assert strategy.targets(layer, num_layers) == targets
        env = RecordingEnv(num_layers=num_layers)
        strategy.on_layer_input(env, layer)
        assert env.predicted() == [(layer, t, "learned") for t in targets]


def test_prefetch_refreshes_predicted_residents_and_copies_only_into_slots_no_predicted_expert_holds():
    env = RecordingEnv(capacity=3)
    env.chunks = {(2, 4): 3, (2, 1): 3, (2, 2): 2, (1, 6): 3}
    env.predictions = {(0, 1): [6, 3], (0, 2): [6, 2, 4, 1, 0]}
    ProMoE().on_layer_input(env, 0)
    assert env.calls == [
        ("predict", 0, 1, "learned"),
        ("request", 1, 6, LOW, True),  # resident: a refresh
        ("request", 1, 3, LOW, True),
        ("predict", 0, 2, "learned"),
        # [6, 2, 4, 1, 0] with capacity 3: residents 4 and 1 are refreshed first; one slot is left
        # that no predicted expert holds, so only the surest missing expert (6) is copied
        ("request", 2, 4, LOW, True),
        ("request", 2, 1, LOW, True),
        ("request", 2, 6, LOW, True),
    ]


def test_prefetch_from_a_later_layer_predicts_one_layer():
    env = RecordingEnv(num_layers=6)
    env.predictions = {(2, 4): [7, 0, 1]}
    ProMoE().on_layer_input(env, 2)
    assert env.calls == [("predict", 2, 4, "learned")] + [("request", 4, e, LOW, True) for e in (7, 0, 1)]


def test_prefetch_of_nothing_requests_nothing():
    env = RecordingEnv()
    ProMoE().on_layer_input(env, 0)
    assert kinds(env) == ["predict", "predict"]


@pytest.mark.parametrize("predictor", ["learned", "gate", "oracle"])
def test_prefetch_uses_the_configured_predictor(predictor):
    for strategy in (ProMoE(predictor=predictor), SkipGate(predictor=predictor)):
        env = RecordingEnv()
        env.predictions = {(0, 1): [2]}
        for layer in range(4):
            strategy.on_layer_input(env, layer)
        assert env.predicted() and {p[2] for p in env.predicted()} == {predictor}
        assert strategy.predictors == {predictor}
        assert strategy.needs_trace == (predictor == "oracle")


# -- skip_gate, static, oracle -----------------------------------------------------------------------


def test_skip_gate_predicts_the_next_layer_with_the_gate_and_runs_in_routing_order():
    strategy = SkipGate()
    assert strategy.predictor == "gate" and strategy.distance == 1
    env = RecordingEnv(num_layers=4, capacity=2)
    env.predictions = {(0, 1): [3, 5, 1], (1, 2): [2], (2, 3): [0, 4]}
    env.chunks = {(1, 5): 3, (2, 7): 3, (2, 3): 2}
    for layer in range(4):
        strategy.on_layer_input(env, layer)
    assert env.predicted() == [(0, 1, "gate"), (1, 2, "gate"), (2, 3, "gate")]
    # whole experts (mixtral-offloading); layer 1: resident 5 refreshed, one free slot for 3 (1 is cut)
    assert env.requests() == [(1, 5, LOW, False), (1, 3, LOW, False), (2, 2, LOW, False), (3, 0, LOW, False),
                              (3, 4, LOW, False)]
    env.calls.clear()
    order = strategy.on_router(env, 2, [3, 7, 6])
    assert order == [3, 7, 6]
    assert env.calls == [("request", 2, 3, HIGH, False), ("request", 2, 6, HIGH, False)]  # no drop_pending
    assert isinstance(strategy.eviction_policy(env), LRU)


def test_skip_gate_unchunked():
    env = RecordingEnv()
    env.predictions = {(0, 1): [3]}
    strategy = SkipGate(chunked=False)
    strategy.on_layer_input(env, 0)
    strategy.on_router(env, 0, [1])
    assert env.requests() == [(1, 3, LOW, False), (0, 1, HIGH, False)]


STATIC_TRACE = RoutingTrace([
    [(1, 2), (2, 3), (2, 1), (4, 2), (5, 1)],  # 2: 4, 1: 3, then 3, 4, 5 once each
    [(7, 6), (6, 0), (0, 7), (3,), (6,)],  # 6: 3, 0: 2, 7: 2, 3: 1
])


def test_static_pins_the_most_popular_experts_per_layer_in_setup():
    strategy = StaticCache()
    assert strategy.needs_trace
    env = RecordingEnv(num_layers=2, capacity=5, trace=STATIC_TRACE)
    strategy.setup(env)
    assert env.requests() == [(0, 2, HIGH, True), (0, 1, HIGH, True), (0, 3, HIGH, True),
                              (1, 6, HIGH, True), (1, 0, HIGH, True), (1, 7, HIGH, True)]
    policy = strategy.eviction_policy(env)
    assert isinstance(policy, Static)
    assert policy.pinned == [{1, 2, 3}, {0, 6, 7}]


def test_static_with_more_spares_than_slots_pins_nothing():
    env = RecordingEnv(num_layers=2, capacity=2, trace=STATIC_TRACE)
    strategy = StaticCache(spare=3)
    strategy.setup(env)
    assert env.requests() == []
    assert strategy.eviction_policy(env).pinned == [set(), set()]
    env = RecordingEnv(num_layers=2, capacity=4, trace=STATIC_TRACE)
    StaticCache(spare=3).setup(env)
    assert env.requests() == [(0, 2, HIGH, True), (1, 6, HIGH, True)]


def test_static_requests_misses_high_in_routing_order():
    env = RecordingEnv(num_layers=2, capacity=5, trace=STATIC_TRACE)
    env.chunks = {(0, 2): 3}
    order = StaticCache().on_router(env, 0, [5, 2, 4])
    assert order == [5, 2, 4]
    assert env.calls == [("request", 0, 5, HIGH, False), ("request", 0, 4, HIGH, False)]  # whole experts


def test_oracle_predicts_with_the_oracle_and_evicts_with_belady_counting_the_forwards():
    strategy = Oracle()
    assert strategy.predictor == "oracle" and strategy.needs_trace and strategy.predictors == {"oracle"}
    trace = RoutingTrace([[(1, 2), (3,), (2, 4), (1,)], [(0,), (1,), (2,), (3,)]])
    env = RecordingEnv(num_layers=2, trace=trace)
    env.predictions = {(0, 1): [1]}
    strategy.on_layer_input(env, 0)
    assert env.predicted() == [(0, 1, "oracle")]
    policy = strategy.eviction_policy(env)
    assert isinstance(policy, Belady) and policy.trace is trace
    assert policy.victim(0, {1, 2, 3}) == 3  # no forward of layer 0 begun yet
    policy.begin_forward(0, None)
    assert policy.victim(0, {1, 2, 3}) == 1
    # the rest is ProMoE's mechanism
    env.calls.clear()
    env.chunks = {(0, 2): 3}
    assert strategy.on_router(env, 0, [1, 2]) == [2, 1]
    assert env.calls == [("request", 0, 1, HIGH, True), ("drop_pending", 0)]


def test_only_the_oracle_and_static_need_the_trace():
    assert not ProMoE().needs_trace and not SkipGate().needs_trace
    assert ProMoE(predictor="oracle").needs_trace
    assert Oracle().needs_trace and StaticCache().needs_trace


def test_labels_name_the_changed_parameters():
    assert ProMoE().label == "promoe"
    assert ProMoE(chunked=False).label == "promoe[chunked=0]"
    assert ProMoE(preempt=False, distance=3).label == "promoe[distance=3,preempt=0]"
    assert Oracle().label == "oracle"
    assert parse("promoe[reorder=0]").label == "promoe[reorder=0]"


# -- parameter validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProMoE(predictor="psychic"),
        lambda: ProMoE(distance=0),
        lambda: ProMoE(distance=-1),
        lambda: SkipGate(predictor="learned2"),
        lambda: SkipGate(distance=0),
        lambda: Oracle(distance=0),
        lambda: StaticCache(spare=0),
        lambda: StaticCache(spare=-2),
        lambda: ProMoE(cache_rate=0),
    ],
)
def test_bad_parameters_raise_value_error_at_construction(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "spec",
    [
        "promoe[predictor=psychic]",
        "promoe[distance=0]",
        "skip_gate[distance=0]",
        "skip_gate[predictor=nope]",
        "oracle[distance=0]",
        "static[spare=0]",
        "promoe[cache_rate=0]",
    ],
)
def test_parse_turns_bad_parameters_into_usage_errors(spec):
    with pytest.raises(UsageError) as raised:
        parse(spec)
    assert spec in str(raised.value)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("promoe", ProMoE()),
        ("promoe[chunked=0,preempt=0,reorder=0]", ProMoE(chunked=False, preempt=False, reorder=False)),
        ("promoe[predictor=gate,distance=1]", ProMoE(predictor="gate", distance=1)),
        ("skip_gate", SkipGate()),
        ("static[spare=3]", StaticCache(spare=3)),
        ("oracle[reorder=0]", Oracle(reorder=False)),
    ],
)
def test_parse_builds_valid_strategies(spec, expected):
    assert parse(spec) == expected


# -- the reactive baselines copy whole experts, as the systems they stand for do ---------------------


@pytest.mark.parametrize("spec, chunked", [("lru", False), ("lru[chunked=1]", True), ("on_demand", False)])
def test_reactive_baselines_request_misses_high_whole_unless_asked_to_chunk(spec, chunked):
    env = RecordingEnv(num_layers=2, capacity=4)
    env.chunks = {(1, 2): 3}
    order = parse(spec).on_router(env, 1, [3, 2, 0])
    assert order == [3, 2, 0]
    want = [3, 2, 0] if spec == "on_demand" else [3, 0]  # on_demand asks for all; the engine skips residents
    assert [call for call in env.calls if call[0] == "request"] == [("request", 1, e, HIGH, chunked) for e in want]


def test_rank_counts_votes_of_guesses_at_least_min_prob_most_votes_first():
    import torch

    from promoe_bench.predictors import rank

    picks = torch.tensor([[3, 1], [1, 5], [1, 3]])
    probs = torch.tensor([[0.5, 0.3], [0.6, 0.1], [0.4, 0.2]])
    assert rank(picks, probs, 8) == [1, 3, 5]  # 1 has three votes, 3 two, 5 one
    assert rank(picks, probs, 8, min_prob=0.25) == [1, 3]  # 5 (0.1) and one vote of 3 (0.2) fall out
    assert rank(picks, probs, 8, min_prob=0.9) == []


def test_rank_breaks_equal_votes_by_probability():
    import torch

    from promoe_bench.predictors import rank

    # one token (a decode step): every guess has one vote, so the surest goes first, not the lowest id
    assert rank(torch.tensor([[2, 7, 5]]), torch.tensor([[0.2, 0.5, 0.3]]), 8) == [7, 5, 2]
    assert rank(torch.tensor([[2, -1, 5]]), torch.tensor([[0.2, 0.9, 0.3]]), 8, min_prob=0.25) == [5]  # no guess: -1
    # two tokens: votes first (2 twice), then summed probability (5: 0.5 over 7: 0.4)
    assert rank(torch.tensor([[2, 7], [2, 5]]), torch.tensor([[0.1, 0.4], [0.1, 0.5]]), 8) == [2, 5, 7]


def test_prefetch_passes_its_min_prob_to_the_predictor():
    seen = []

    class Env(RecordingEnv):
        def predict(self, layer, target, predictor, min_prob=0.0, recall=1.0):
            seen.append(min_prob)
            return super().predict(layer, target, predictor)

    ProMoE(min_prob=0.2).on_layer_input(Env(num_layers=4), 1)
    assert seen == [0.2]
    with pytest.raises(UsageError, match="min_prob"):
        parse("promoe[min_prob=1.5]")

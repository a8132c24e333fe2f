"""RoutingTrace, the Belady, Static and forward-ranked LRU policies, and the cache's last-resort rule when a
policy says None.

Pure data structures: no threads, no copies.
"""

import random

import pandas as pd
import pytest

from promoe_bench.cache import ExpertCache
from promoe_bench.policies import LRU, Belady, ForwardRankedLRU, Static
from promoe_bench.trace import RoutingTrace

CHUNK_BYTES = (100, 100, 50)

# layer 0: four forwards; layer 1: its most popular expert has the highest id of the tied ones
FORWARDS = [
    [(1, 2), (3,), (2, 4), (1,)],
    [(5, 0), (5, 3), (0, 3), (7,)],
]


@pytest.fixture
def trace():
    return RoutingTrace(FORWARDS)


# -- RoutingTrace -------------------------------------------------------------------------------------


def test_trace_shape(trace):
    assert trace.num_layers == 2
    assert trace.length == 4


def test_at_wraps_over_repeats(trace):
    for position in range(12):
        assert trace.at(0, position) == FORWARDS[0][position % 4]
        assert trace.at(1, position) == FORWARDS[1][position % 4]
    assert trace.at(0, 4) == (1, 2)
    assert trace.at(0, 9) == (3,)


def test_next_use_counts_from_the_position(trace):
    # expert 2 of layer 0 is routed in forwards 0 and 2
    assert trace.next_use(0, 2, 0) == 0  # routed at the position itself
    assert trace.next_use(0, 2, 1) == 1
    assert trace.next_use(0, 2, 2) == 0
    # expert 1 of layer 0 is routed in forwards 0 and 3
    assert trace.next_use(0, 1, 1) == 2
    assert trace.next_use(0, 3, 2) == 3  # forward 1 of the next repeat


def test_next_use_wraps_into_the_next_repeat(trace):
    assert trace.next_use(0, 2, 3) == 1  # forward 0 of the next repeat
    assert trace.next_use(0, 4, 3) == 3  # forward 2 of the next repeat
    assert trace.next_use(1, 7, 0) == 3
    assert trace.next_use(1, 7, 3) == 0
    # a later repeat reads like the first
    for position in range(4):
        for expert in range(8):
            assert trace.next_use(0, expert, position + 8) == trace.next_use(0, expert, position)


def test_next_use_of_a_never_routed_expert_is_the_length(trace):
    for position in range(9):
        assert trace.next_use(0, 6, position) == trace.length
        assert trace.next_use(1, 1, position) == trace.length
    # every routed expert comes back sooner than that
    for layer in range(2):
        for expert in {e for f in FORWARDS[layer] for e in f}:
            for position in range(4):
                assert trace.next_use(layer, expert, position) < trace.length


def test_next_use_matches_a_brute_force_scan():
    rng = random.Random(3)
    forwards = [[tuple(rng.sample(range(8), rng.randint(1, 3))) for _ in range(13)] for _ in range(3)]
    trace = RoutingTrace(forwards)
    for layer in range(3):
        for expert in range(9):
            for position in range(40):
                expected = next((d for d in range(13) if expert in forwards[layer][(position + d) % 13]), 13)
                assert trace.next_use(layer, expert, position) == expected


def test_popularity_most_routed_first_ties_by_lower_id(trace):
    assert trace.popularity(0) == [1, 2, 3, 4]  # 1 and 2 twice, 3 and 4 once
    assert trace.popularity(1) == [0, 3, 5, 7]  # 0, 3 and 5 twice; 7 once; never-routed experts absent
    skewed = RoutingTrace([[(9,), (9, 1), (9, 1), (4,), (2,)]])
    assert skewed.popularity(0) == [9, 1, 2, 4]


def test_every_layer_must_have_the_same_nonzero_number_of_forwards():
    with pytest.raises(AssertionError):
        RoutingTrace([[(1,)], [(1,), (2,)]])
    with pytest.raises(AssertionError):
        RoutingTrace([[], []])


def test_from_layer_rows_orders_by_batch_then_step_per_layer():
    rows = []
    # (batch, step) in the order the run made them; steps 2 and 10 would sort the wrong way as text
    forwards = {(0, 0): ["3 1", "0 2"], (0, 2): ["1", "5 4"], (0, 10): ["7 0", "2"], (1, 0): ["6 5", "1 3"]}
    for (batch, step), per_layer in forwards.items():
        for layer, routed in enumerate(per_layer):
            rows.append({"batch": batch, "step": step, "layer": layer, "routed": routed, "hits": 0})
    shuffled = pd.DataFrame(random.Random(0).sample(rows, len(rows)))
    trace = RoutingTrace.from_layer_rows(shuffled)
    assert trace.num_layers == 2 and trace.length == 4
    assert trace.forwards[0] == [(3, 1), (1,), (7, 0), (6, 5)]  # routing order within a forward is kept
    assert trace.forwards[1] == [(0, 2), (5, 4), (2,), (1, 3)]
    assert all(isinstance(e, int) for f in trace.forwards[0] for e in f)


def test_from_layer_rows_accepts_a_single_routed_expert_stored_as_a_number():
    layers = pd.DataFrame({"batch": [0, 0, 0, 0], "step": [1, 0, 1, 0], "layer": [0, 0, 1, 1],
                           "routed": [4, 2, 6, 3]})
    trace = RoutingTrace.from_layer_rows(layers)
    assert trace.forwards == [[(2,), (4,)], [(3,), (6,)]]


# -- Belady ---------------------------------------------------------------------------------------------


def belady_at(trace, *positions) -> Belady:
    """A Belady policy whose layers have begun `positions[layer]` forwards."""
    belady = Belady(trace)
    for layer, position in enumerate(positions):
        for _ in range(position):
            belady.begin_forward(layer, None)
    return belady


def test_belady_evicts_the_farthest_next_use(trace):
    belady = belady_at(trace, 1, 0)
    # from forward 1 of layer 0: 3 is used now (0), 2 in 1, 1 in 2, 4 in 1
    assert belady.victim(0, {1, 2, 3}) == 1
    assert belady.victim(0, {2, 3}) == 2
    assert belady.victim(0, {3}) == 3


def test_belady_evicts_a_never_used_again_expert_first_lowest_id(trace):
    belady = belady_at(trace, 0, 0)
    assert belady.victim(0, {1, 2, 3, 4, 6}) == 6
    assert belady.victim(0, {1, 2, 3, 4, 7, 6}) == 6  # both never routed: the lower id
    assert belady.victim(1, {0, 2, 5, 7}) == 2


def test_belady_ties_go_to_the_lowest_id(trace):
    belady = belady_at(trace, 1, 1)
    # layer 1 from forward 1: 5 and 3 now (0), 0 in 1, 7 in 2
    assert belady.victim(1, {3, 5}) == 3
    assert belady.victim(1, {5, 0, 3}) == 0
    belady = belady_at(RoutingTrace([[(1, 2), (5, 4)]]), 0)
    assert belady.victim(0, {5, 4}) == 4  # both come back in the same forward


def test_belady_counts_each_layers_forwards_as_they_begin(trace):
    belady = Belady(trace)
    candidates = {1, 2, 3}
    answers = []
    for _ in range(6):
        answers.append(belady.victim(0, candidates))
        belady.begin_forward(0, None)
    # from 0: 1:0 2:0 3:1 -> 3; from 1: 1:2 2:1 3:0 -> 1; from 2: 1:1 2:0 3:3 -> 3;
    # from 3: 1:0 2:1 3:2 -> 3; then the next repeat
    assert answers == [3, 1, 3, 3, 3, 1]
    for _ in range(3):  # layers keep their own count
        belady.begin_forward(1, None)
    assert belady.victim(1, {0, 3, 5}) == 3  # from forward 3 of layer 1: 0 and 5 in 1, 3 in 2
    assert belady.victim(0, {1, 2, 3}) == answers[2]  # layer 0 kept its own count: forward 6, as forward 2


# -- Static ---------------------------------------------------------------------------------------------


def test_static_never_picks_a_pinned_expert():
    static = Static([{1, 2}, {5}])
    for expert in (1, 2, 3, 4):
        static.touch(0, expert)
    assert static.victim(0, {1, 2, 3, 4}) == 3  # 1 and 2 are older but pinned
    assert static.victim(0, {1, 4}) == 4
    assert static.victim(1, {5, 0}) == 0  # layers have their own pinned sets


def test_static_returns_none_when_only_pinned_candidates_remain():
    static = Static([{1, 2}, set()])
    for expert in (1, 2, 3):
        static.touch(0, expert)
    assert static.victim(0, {1, 2}) is None
    assert static.victim(0, {2}) is None
    assert static.victim(1, {2}) == 2  # nothing pinned in layer 1


def test_static_spares_are_lru_among_themselves():
    static, lru = Static([{0}]), LRU(1)
    rng = random.Random(5)
    for _ in range(300):
        expert = rng.randrange(6)
        if rng.random() < 0.2:
            static.forget(0, expert)
            lru.forget(0, expert)
        else:
            static.touch(0, expert)
            lru.touch(0, expert)
        candidates = set(rng.sample(range(6), rng.randint(1, 6)))
        spare = candidates - {0}
        assert static.victim(0, candidates) == (lru.victim(0, spare) if spare else None)


# -- the cache when a policy says None ---------------------------------------------------------------


def full_cache(policy, experts, capacity=3):
    cache = ExpertCache(1, capacity, policy, CHUNK_BYTES)
    for expert in experts:
        entry = cache.claim(0, expert, last_resort=False)
        entry.copying, entry.chunks_ready = False, 3
    return cache


# -- ForwardRankedLRU ---------------------------------------------------------------------------------


def oldest_first(policy, layer, experts):
    order, left = [], set(experts)
    while left:
        order.append(policy.victim(layer, left))
        left.discard(order[-1])
    return order


def test_forward_ranked_lru_ranks_a_batched_forward_by_tokens_whatever_the_run_order():
    for run_order in ([7, 2, 5], [2, 5, 7], [5, 7, 2]):
        policy = ForwardRankedLRU(num_layers=1)
        policy.touch(0, 9)  # used in an earlier forward: older than all of this one's
        policy.begin_forward(0, {7: 3, 2: 1, 5: 2})
        for expert in run_order:
            policy.computed(0, expert)
        assert oldest_first(policy, 0, [9, 7, 2, 5]) == [9, 2, 5, 7], run_order


def test_forward_ranked_lru_keeps_run_order_for_one_token_and_for_equal_counts():
    policy = ForwardRankedLRU(num_layers=1)
    policy.begin_forward(0, None)  # a decode step: as LRU
    for expert in (4, 1, 3):
        policy.computed(0, expert)
    assert oldest_first(policy, 0, [1, 3, 4]) == [4, 1, 3]
    policy.begin_forward(0, {6: 2, 0: 2})
    for expert in (6, 0):
        policy.computed(0, expert)
    assert oldest_first(policy, 0, [0, 6]) == [6, 0]


def test_forward_ranked_lru_never_brings_back_an_expert_evicted_in_the_forward():
    policy = ForwardRankedLRU(num_layers=1)
    policy.begin_forward(0, {1: 5, 2: 1})
    policy.computed(0, 1)
    policy.forget(0, 1)  # evicted to make room for a later expert
    policy.computed(0, 2)  # ranks before 1, which must not come back
    assert list(policy._order[0]) == [2]


def test_promoe_ranks_a_forward_by_tokens_and_oracle_keeps_belady():
    from promoe_bench.environment import ModelShape
    from promoe_bench.strategies import parse

    class Env:
        shape = ModelShape(2, 8, 2, expert_bytes=1000, capacity=4)
        trace = RoutingTrace(FORWARDS)

        def position(self, layer):
            return 0

    assert type(parse("promoe").eviction_policy(Env())) is ForwardRankedLRU
    assert type(parse("oracle").eviction_policy(Env())) is Belady
    assert type(parse("lru").eviction_policy(Env())) is LRU  # a reactive baseline stays independent of timing


def test_claim_refuses_when_the_policy_keeps_every_candidate():
    cache = full_cache(Static([{1, 2, 3}]), [1, 2, 3])
    assert cache.claim(0, 4, last_resort=False) is None
    assert cache.claim(0, 4, last_resort=True) is None  # nothing pending: no last resort either
    assert sorted(cache.residents(0)) == [1, 2, 3]
    assert cache.evictions == [0]


def test_claim_falls_back_to_the_last_pending_expert_when_the_policy_says_none():
    cache = full_cache(Static([{1, 2}]), [1, 2, 3])
    cache.begin_forward(0, [4, 3, 2])  # 1 is the only non-pending candidate, and it is pinned
    assert cache.claim(0, 4, last_resort=False) is None
    assert sorted(cache.residents(0)) == [1, 2, 3]
    entry = cache.claim(0, 4, last_resort=True)
    assert entry is not None
    assert cache.lookup(0, 2) is None  # the pending expert that runs last gives way, pinned or not
    assert sorted(cache.residents(0)) == [1, 3, 4]
    assert cache.evictions == [1]


class Never(LRU):
    """A policy that keeps everyone."""

    def victim(self, layer, candidates):
        return None


def test_last_resort_applies_to_any_policy_that_says_none():
    cache = full_cache(Never(1), [1, 2, 3])
    cache.begin_forward(0, [3, 1, 5])
    assert cache.claim(0, 5, last_resort=False) is None
    cache.in_use.add((0, 1))  # the last pending expert is in use: the one before it goes
    assert cache.claim(0, 5, last_resort=True) is not None
    assert cache.lookup(0, 3) is None
    assert sorted(cache.residents(0)) == [1, 2, 5]

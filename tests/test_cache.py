"""ExpertCache bookkeeping and the LRU policy: pure data structures, no threads."""

import random

import pytest

from promoe_bench.cache import ExpertCache
from promoe_bench.policies import LRU

NUM_LAYERS = 2
CAPACITY = 3
CHUNK_BYTES = (100, 100, 50)


@pytest.fixture
def cache():
    return ExpertCache(NUM_LAYERS, CAPACITY, LRU(NUM_LAYERS), CHUNK_BYTES)


def fill(cache, layer, experts, copying=False):
    """Claim a slot for each expert, as the copy engine would, and mark its copy finished."""
    entries = {}
    for expert in experts:
        entry = cache.claim(layer, expert, last_resort=False)
        assert entry is not None
        entry.copying = copying
        entries[expert] = entry
    return entries


def layer_slots(layer):
    return set(range(layer * CAPACITY, (layer + 1) * CAPACITY))


# -- LRU ---------------------------------------------------------------------------------------


def test_lru_victim_is_least_recently_touched_candidate():
    lru = LRU(1)
    for expert in (4, 2, 7, 5):
        lru.touch(0, expert)
    lru.touch(0, 4)  # 4 becomes the most recent: order 2, 7, 5, 4
    assert lru.victim(0, {2, 4, 5, 7}) == 2
    assert lru.victim(0, {4, 5, 7}) == 7
    assert lru.victim(0, {4, 5}) == 5


def test_lru_layers_are_independent():
    lru = LRU(2)
    lru.touch(0, 1)
    lru.touch(0, 2)
    lru.touch(1, 2)
    lru.touch(1, 1)
    assert lru.victim(0, {1, 2}) == 1
    assert lru.victim(1, {1, 2}) == 2


def test_lru_forget_makes_the_expert_as_if_never_touched():
    lru, fresh = LRU(1), LRU(1)
    for expert in (1, 2, 3):
        lru.touch(0, expert)
    for expert in (2, 3):
        fresh.touch(0, expert)
    lru.forget(0, 1)
    lru.forget(0, 9)  # forgetting an unknown expert is harmless
    for candidates in ({1, 2}, {1, 3}, {1, 2, 3}, {2, 3}):
        assert lru.victim(0, candidates) == fresh.victim(0, candidates)


def test_lru_untouched_candidates_fall_back_to_the_smallest_expert():
    lru = LRU(1)
    assert lru.victim(0, {6, 3, 8}) == 3
    lru.touch(0, 1)
    lru.forget(0, 1)
    assert lru.victim(0, {8, 6}) == 6


# -- claim ---------------------------------------------------------------------------------------


def test_claim_takes_the_layers_free_slots_before_evicting(cache):
    entries = fill(cache, 1, [10, 11, 12])
    assert {e.slot for e in entries.values()} == layer_slots(1)
    assert cache.evictions == [0, 0]
    fresh = cache.claim(0, 5, last_resort=False)
    assert fresh.slot in layer_slots(0) and fresh.copying and fresh.chunks_ready == 0


def test_claim_evicts_the_least_recently_used_expert_when_full(cache):
    entries = fill(cache, 0, [1, 2, 3])
    for expert in (2, 1, 3):
        cache.policy.touch(0, expert)
    entry = cache.claim(0, 4, last_resort=False)
    assert entry.slot == entries[2].slot  # 2's slot is reused
    assert cache.lookup(0, 2) is None
    assert sorted(cache.residents(0)) == [1, 3, 4]
    assert cache.evictions == [1, 0]


def test_an_expert_never_used_since_it_arrived_is_older_than_one_used_after_it(cache):
    # Arrival counts as a use: otherwise speculative copies that were never used would outrank every
    # expert compute actually touched, and squat their slots forever.
    fill(cache, 0, [1, 2, 3])
    cache.policy.touch(0, 1)
    cache.claim(0, 4, last_resort=False)
    assert cache.lookup(0, 2) is None
    cache.lookup(0, 4).copying = False
    cache.claim(0, 5, last_resort=False)
    assert cache.lookup(0, 3) is None
    assert sorted(cache.residents(0)) == [1, 4, 5]


def test_remove_gives_the_slot_back(cache):
    entries = fill(cache, 0, [1, 2, 3])
    removed = cache.remove(0, 2)
    assert removed is entries[2]
    entry = cache.claim(0, 7, last_resort=False)
    assert entry.slot == entries[2].slot
    assert cache.evictions == [0, 0]


def test_claim_asserts_the_expert_is_not_already_cached(cache):
    fill(cache, 0, [1])
    with pytest.raises(AssertionError):
        cache.claim(0, 1, last_resort=False)


def test_random_claims_and_removes_keep_slots_exclusive_and_within_capacity(cache):
    rng = random.Random(1)
    evictions = [0] * NUM_LAYERS
    for _ in range(3000):
        layer = rng.randrange(NUM_LAYERS)
        expert = rng.randrange(8)
        residents = set(cache.residents(layer))
        copying = {e for e in residents if cache.lookup(layer, e).copying}
        if expert in residents:
            if rng.random() < 0.5:
                cache.remove(layer, expert)
            else:
                entry = cache.lookup(layer, expert)
                entry.copying = rng.random() < 0.3
                cache.policy.touch(layer, expert)
        else:
            entry = cache.claim(layer, expert, last_resort=False)
            after = set(cache.residents(layer))
            if entry is None:
                assert after == residents == copying  # full, and nothing was evictable
            else:
                lost = residents - after
                assert len(lost) == (1 if len(residents) == CAPACITY else 0)
                assert not lost & copying
                evictions[layer] += len(lost)
                entry.copying = rng.random() < 0.3
        all_slots = [cache.lookup(ly, e).slot for ly in range(NUM_LAYERS) for e in cache.residents(ly)]
        assert len(all_slots) == len(set(all_slots)), "two resident experts share a slot"
        for ly in range(NUM_LAYERS):
            assert len(cache.residents(ly)) <= CAPACITY
            assert {cache.lookup(ly, e).slot for e in cache.residents(ly)} <= layer_slots(ly)
    assert cache.evictions == evictions
    assert sum(evictions) > 100  # the run did exercise eviction


def test_claim_never_evicts_an_expert_being_copied(cache):
    fill(cache, 0, [1, 2, 3])
    for expert in (1, 2, 3):
        cache.policy.touch(0, expert)
    cache.lookup(0, 1).copying = True
    cache.claim(0, 4, last_resort=False)
    assert cache.lookup(0, 1) is not None
    assert cache.lookup(0, 2) is None


def test_claim_never_evicts_an_expert_in_use(cache):
    fill(cache, 0, [1, 2, 3])
    for expert in (1, 2, 3):
        cache.policy.touch(0, expert)
    cache.in_use.add((0, 1))
    cache.claim(0, 4, last_resort=True)
    assert cache.lookup(0, 1) is not None
    assert cache.lookup(0, 2) is None


def test_claim_returns_none_when_nothing_is_evictable(cache):
    fill(cache, 0, [1, 2, 3])
    cache.lookup(0, 1).copying = True
    cache.lookup(0, 2).copying = True
    cache.in_use.add((0, 3))
    for last_resort in (False, True):
        assert cache.claim(0, 4, last_resort=last_resort) is None
    assert sorted(cache.residents(0)) == [1, 2, 3]
    assert cache.lookup(0, 4) is None
    assert cache.evictions == [0, 0]
    # A full layer does not block another layer.
    assert cache.claim(1, 4, last_resort=False) is not None


# -- pending (the current forward) -------------------------------------------------------------


def test_pending_experts_are_not_evicted_without_last_resort(cache):
    fill(cache, 0, [1, 2, 3])
    for expert in (1, 2, 3):
        cache.policy.touch(0, expert)
    cache.begin_forward(0, [1, 2, 3])
    assert cache.claim(0, 4, last_resort=False) is None
    assert sorted(cache.residents(0)) == [1, 2, 3]


def test_a_non_pending_expert_is_evicted_before_any_pending_one(cache):
    fill(cache, 0, [1, 2, 3])
    for expert in (1, 2, 3):
        cache.policy.touch(0, expert)
    cache.begin_forward(0, [1, 3, 9])  # 2 is the most recently used but not routed
    assert cache.claim(0, 9, last_resort=True) is not None
    assert cache.lookup(0, 2) is None


def test_last_resort_evicts_the_pending_expert_that_runs_last(cache):
    fill(cache, 0, [1, 2, 3])
    for expert in (3, 1, 2):
        cache.policy.touch(0, expert)
    cache.begin_forward(0, [4, 2, 3, 1, 5])  # 5 is pending too but has no slot
    assert cache.claim(0, 4, last_resort=True) is not None
    assert cache.lookup(0, 1) is None
    assert cache.evictions == [1, 0]


def test_last_resort_skips_pending_experts_that_are_copying_or_in_use(cache):
    fill(cache, 0, [1, 2, 3])
    cache.begin_forward(0, [4, 3, 2, 1])
    cache.lookup(0, 1).copying = True
    cache.in_use.add((0, 2))
    assert cache.claim(0, 4, last_resort=True) is not None
    assert cache.lookup(0, 3) is None


def test_computed_removes_from_pending_and_touches(cache):
    fill(cache, 0, [1, 2, 3])
    cache.begin_forward(0, [1, 2, 3])
    cache.computed(0, 1)
    # 1 is no longer pending: the only candidate without last resort.
    assert cache.claim(0, 4, last_resort=False) is not None
    assert cache.lookup(0, 1) is None
    cache.computed(0, 3)
    cache.computed(0, 2)  # used in the reverse of their arrival order
    cache.in_use.add((0, 4))
    assert cache.claim(0, 5, last_resort=False) is not None
    assert cache.lookup(0, 3) is None
    assert sorted(cache.residents(0)) == [2, 4, 5]


def test_begin_forward_replaces_the_previous_order(cache):
    fill(cache, 0, [1, 2, 3])
    cache.begin_forward(0, [1, 2, 3])
    cache.begin_forward(0, [7])
    assert cache.claim(0, 7, last_resort=False) is not None
    assert len(cache.residents(0)) == CAPACITY

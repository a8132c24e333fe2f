"""What each baseline strategy copies, and that the cache stays within its capacity."""

from collections import OrderedDict

import pytest
import torch

from promoe_bench.cache import ExpertCache
from promoe_bench.checkpoint import load_checkpoint

from .runtime_helpers import run_generation

GEN_LEN = 8


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return load_checkpoint(str(checkpoints["qwen3_moe"]), torch.device("cpu"))


def prompt(batch=1, length=2, seed=3):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def routed(row) -> list[int]:
    return [int(e) for e in str(row["routed"]).split()]


@pytest.fixture
def capacity_checked(monkeypatch):
    """Fail the moment any layer holds more experts than its slots."""
    original = ExpertCache.claim

    def claim(self, layer, expert, last_resort, prefetch=False):
        entry = original(self, layer, expert, last_resort, prefetch)
        assert len(self.residents(layer)) <= self.capacity, f"layer {layer} over capacity"
        return entry

    monkeypatch.setattr(ExpertCache, "claim", claim)


@pytest.mark.parametrize("spec", ["on_demand", "lru", "lru[cache_rate=0.25]"])
def test_cache_never_exceeds_its_capacity(loaded, spec, capacity_checked):
    _, runtime = run_generation(loaded, spec, prompt(batch=2, length=9), GEN_LEN)
    assert runtime.pool.buffer.shape[0] == loaded.store.num_layers * runtime.cache.capacity
    assert sum(row["misses"] for row in runtime.recorder.rows) > 0


def test_full_gpu_copies_nothing_after_loading(loaded):
    _, runtime = run_generation(loaded, "full_gpu", prompt(batch=2, length=9), GEN_LEN)
    rows = runtime.recorder.rows
    assert sum(row["bytes"] for row in rows) == 0
    assert sum(row["copies"] for row in rows) == 0
    assert all(row["misses"] == 0 for row in rows)


def test_on_demand_copies_every_routed_expert_every_time(loaded):
    _, runtime = run_generation(loaded, "on_demand", prompt(batch=2, length=9), GEN_LEN)
    rows = runtime.recorder.rows
    expected = sum(len(routed(row)) for row in rows) * loaded.store.layout.nbytes
    assert sum(row["bytes"] for row in rows) == expected
    assert all(row["hits"] == 0 for row in rows)


def reference_lru(rows, capacity: int) -> tuple[int, int]:
    """Per-layer LRU over the recorded routing: a layer's routed experts are needed together, so hits
    are those resident when the router chose; misses evict the least recently used non-routed expert;
    every routed expert is then used in routing order."""
    caches: dict[int, OrderedDict] = {}
    hits = misses = 0
    for row in rows:
        cache = caches.setdefault(row["layer"], OrderedDict())
        experts = routed(row)
        assert len(experts) <= capacity, "the reference assumes a layer's routed set fits the cache"
        for expert in experts:
            if expert in cache:
                hits += 1
                continue
            misses += 1
            if len(cache) == capacity:
                victim = next(e for e in cache if e not in experts)
                del cache[victim]
            cache[expert] = None
        for expert in experts:
            cache.move_to_end(expert)
    return hits, misses


@pytest.mark.parametrize("cache_rate, prompt_len", [(0.25, 1), (0.5, 2)])
def test_lru_hits_and_misses_match_a_reference_lru(loaded, cache_rate, prompt_len):
    # batch 1 and top-2: a prompt of n tokens routes to at most 2n experts per layer, within capacity
    _, runtime = run_generation(loaded, "lru", prompt(length=prompt_len), 24, cache_rate=cache_rate)
    rows = runtime.recorder.rows
    want_hits, want_misses = reference_lru(rows, runtime.cache.capacity)
    assert (sum(r["hits"] for r in rows), sum(r["misses"] for r in rows)) == (want_hits, want_misses)
    assert want_hits > 0 and want_misses > 0
    assert sum(r["copies"] for r in rows) == want_misses

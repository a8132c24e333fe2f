"""Eviction policies: which resident expert of a layer gives up its slot. Pure policy, no mechanism.

The cache tells a policy when an expert is used and asks it to rank candidates; the cache alone decides
which experts may be candidates at all (never one being copied or computed with).
"""

from abc import ABC, abstractmethod
from collections.abc import Iterable


class EvictionPolicy(ABC):
    @abstractmethod
    def touch(self, layer: int, expert: int) -> None:
        """`expert` of `layer` was used (computed with, or prefetched while resident)."""

    @abstractmethod
    def forget(self, layer: int, expert: int) -> None:
        """`expert` left the cache."""

    def begin_forward(self, layer: int, tokens: dict[int, int] | None) -> None:
        """A forward of `layer` begins; `tokens`: how many tokens chose each routed expert (None: one token)."""

    def computed(self, layer: int, expert: int) -> None:
        """`expert` has done its work in the layer's current forward."""
        self.touch(layer, expert)

    @abstractmethod
    def victim(self, layer: int, candidates: Iterable[int]) -> int | None:
        """The candidate to evict, or None: none may go (or there are none). `candidates` answers `in` and
        iterates (a set, or the cache's lazy view: test membership rather than list them all)."""


class LRU(EvictionPolicy):
    """Least recently used, per layer."""

    def __init__(self, num_layers: int):
        self._order: list[dict[int, None]] = [{} for _ in range(num_layers)]  # insertion order: oldest first

    def touch(self, layer, expert):
        order = self._order[layer]
        order.pop(expert, None)
        order[expert] = None  # now the newest

    def forget(self, layer, expert):
        self._order[layer].pop(expert, None)

    def victim(self, layer, candidates):
        for expert in self._order[layer]:
            if expert in candidates and not self.keeps(layer, expert):
                return expert
        # never used since it arrived: any order is as good; keep it deterministic
        return min((e for e in candidates if not self.keeps(layer, e)), default=None)

    def keeps(self, layer: int, expert: int) -> bool:
        """Never evicted, whatever its age."""
        return False


class ForwardRankedLRU(LRU):
    """LRU in which, within one forward, an expert that more tokens chose counts as used later, whatever
    the order the experts ran in (equal counts: that order). A strategy that runs the cached experts of a
    prompt first would otherwise leave LRU holding the ones it ran last, those that had not been cached.
    How many experts ran when a copy claims a slot depends on thread timing, so this policy's choices do
    too: fine for a strategy whose copies race compute anyway, not for the reactive baselines."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self._tokens: list[dict[int, int] | None] = [None] * num_layers
        self._done: list[list[int]] = [[] for _ in range(num_layers)]  # computed this forward, fewest tokens first

    def begin_forward(self, layer, tokens):
        self._tokens[layer], self._done[layer] = tokens, []

    def computed(self, layer, expert):
        tokens, done = self._tokens[layer], self._done[layer]
        if tokens is None or not done or tokens[done[-1]] <= tokens[expert]:
            done.append(expert)
            self.touch(layer, expert)
            return
        at = len(done)
        while at and tokens[done[at - 1]] > tokens[expert]:
            at -= 1
        done.insert(at, expert)
        order = self._order[layer]
        for later in done[at:]:  # this forward's experts that more tokens chose stay newer than it
            if later == expert or later in order:  # not one evicted since
                self.touch(layer, later)


class Static(LRU):
    """A pinned set per layer never leaves; the other slots (the spares) are LRU among themselves."""

    def __init__(self, pinned: list[set[int]]):
        super().__init__(len(pinned))
        self.pinned = pinned

    def keeps(self, layer, expert):
        return expert in self.pinned[layer]


class Belady(EvictionPolicy):
    """Evict the expert whose next use is farthest away (Belady's MIN), from a recorded routing trace.

    The policy counts each layer's forwards itself (`begin_forward`): the forward in progress has its
    experts protected by the cache, so "next use" counts from the forward after it."""

    def __init__(self, trace):
        self.trace = trace
        self._position = [0] * len(trace.forwards)  # per layer, forwards begun so far

    def begin_forward(self, layer, tokens):
        self._position[layer] += 1

    def touch(self, layer, expert):
        pass

    def forget(self, layer, expert):
        pass

    def victim(self, layer, candidates):
        here = self._position[layer]
        return max(sorted(candidates), key=lambda e: self.trace.next_use(layer, e, here), default=None)

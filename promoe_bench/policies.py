"""Eviction policies: which resident expert of a layer gives up its slot. Pure policy, no mechanism.

The cache tells a policy when an expert is used and asks it to rank candidates; the cache alone decides
which experts may be candidates at all (never one being copied or computed with).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable


class EvictionPolicy(ABC):
    @abstractmethod
    def touch(self, layer: int, expert: int) -> None:
        """`expert` of `layer` was used (computed with, or prefetched while resident)."""

    @abstractmethod
    def forget(self, layer: int, expert: int) -> None:
        """`expert` left the cache."""

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


class Static(LRU):
    """A pinned set per layer never leaves; the other slots (the spares) are LRU among themselves."""

    def __init__(self, pinned: list[set[int]]):
        super().__init__(len(pinned))
        self.pinned = pinned

    def keeps(self, layer, expert):
        return expert in self.pinned[layer]


class Belady(EvictionPolicy):
    """Evict the expert whose next use is farthest away (Belady's MIN), from a recorded routing trace.

    `position(layer)` is how many forwards of the layer have been routed: the forward in progress has
    its experts protected by the cache, so "next use" counts from the forward after it."""

    def __init__(self, trace, position: Callable[[int], int]):
        self.trace, self.position = trace, position

    def touch(self, layer, expert):
        pass

    def forget(self, layer, expert):
        pass

    def victim(self, layer, candidates):
        here = self.position(layer)
        return max(sorted(candidates), key=lambda e: self.trace.next_use(layer, e, here), default=None)

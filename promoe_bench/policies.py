"""Eviction policies: which resident expert of a layer gives up its slot. Pure policy, no mechanism.

The cache tells a policy when an expert is used and asks it to rank candidates; the cache alone decides
which experts may be candidates at all (never one being copied or computed with).
"""

from abc import ABC, abstractmethod
from collections import OrderedDict


class EvictionPolicy(ABC):
    @abstractmethod
    def touch(self, layer: int, expert: int) -> None:
        """`expert` of `layer` was used (computed with, or prefetched while resident)."""

    @abstractmethod
    def forget(self, layer: int, expert: int) -> None:
        """`expert` left the cache."""

    @abstractmethod
    def victim(self, layer: int, candidates: set[int]) -> int:
        """The candidate to evict; `candidates` is never empty."""


class LRU(EvictionPolicy):
    """Least recently used, per layer."""

    def __init__(self, num_layers: int):
        self._order = [OrderedDict() for _ in range(num_layers)]  # oldest first

    def touch(self, layer, expert):
        self._order[layer][expert] = None
        self._order[layer].move_to_end(expert)

    def forget(self, layer, expert):
        self._order[layer].pop(expert, None)

    def victim(self, layer, candidates):
        for expert in self._order[layer]:
            if expert in candidates:
                return expert
        return min(candidates)  # never used since it arrived: any order is as good; keep it deterministic

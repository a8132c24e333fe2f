"""The routing of a workload, recorded by one greedy pass: what the oracle knows about the future.

Greedy decoding is deterministic, so every strategy of a comparison sees the same sequence of forwards:
per MoE layer, one set of routed experts per step of every batch, in order. A run repeats that sequence
(warm-up and measured repeats), so position n of a layer reads forward n modulo the sequence's length.
"""

from bisect import bisect_left
from collections import Counter

import pandas as pd


class RoutingTrace:
    def __init__(self, forwards: list[list[tuple[int, ...]]]):
        """`forwards[layer]`: the layer's routed experts (routing order), one tuple per forward."""
        lengths = {len(f) for f in forwards}
        assert len(lengths) == 1 and lengths != {0}, "every layer has the same, non-zero number of forwards"
        self.forwards = forwards
        self.length = lengths.pop()
        # per layer, expert -> sorted forward indices that route it (next use by bisection, for Belady)
        self._uses: list[dict[int, list[int]]] = []
        for layer_forwards in forwards:
            uses: dict[int, list[int]] = {}
            for index, experts in enumerate(layer_forwards):
                for expert in experts:
                    uses.setdefault(expert, []).append(index)
            self._uses.append(uses)

    @classmethod
    def from_layer_rows(cls, layers: pd.DataFrame) -> "RoutingTrace":
        """From a run's layers table (one strategy, one repeat): the `routed` column, in step order."""
        ordered = layers.sort_values(["batch", "step", "layer"], kind="stable")
        forwards: list[list[tuple[int, ...]]] = [[] for _ in range(ordered["layer"].max() + 1)]
        for layer, routed in zip(ordered["layer"], ordered["routed"], strict=True):
            forwards[layer].append(tuple(int(e) for e in str(routed).split()))
        return cls(forwards)

    @property
    def num_layers(self) -> int:
        return len(self.forwards)

    def at(self, layer: int, position: int) -> tuple[int, ...]:
        """The experts routed in forward `position` of `layer` (counting over repeats)."""
        return self.forwards[layer][position % self.length]

    def next_use(self, layer: int, expert: int, position: int) -> int:
        """Forwards from `position` until `expert` is routed again in `layer` (length-many when never)."""
        uses = self._uses[layer].get(expert)
        if not uses:
            return self.length
        here = position % self.length
        i = bisect_left(uses, here)
        ahead = uses[i] if i < len(uses) else uses[0] + self.length  # wraps into the next repeat
        return ahead - here

    def popularity(self, layer: int) -> list[int]:
        """The layer's experts, the most often routed first (ties: lower id first)."""
        counts = Counter(e for experts in self.forwards[layer] for e in experts)
        return sorted(counts, key=lambda e: (-counts[e], e))

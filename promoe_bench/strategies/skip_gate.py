from dataclasses import dataclass

from promoe_bench.environment import Priority

from .prefetch import Prefetching


@dataclass
class SkipGate(Prefetching):
    """LRU cache plus a prefetch of layer l+1 guessed by layer l+1's own router on layer l's input
    (mixtral-offloading, AdapMoE). No preemption, routing order, whole-expert copies."""

    name = "skip_gate"
    summary = "LRU plus prefetch of the next layer through its router applied to this layer's input"

    predictor: str = "gate"
    distance: int = 1
    chunked: bool = False  # whole experts, like mixtral-offloading

    def on_router(self, env, layer, experts):
        for expert in experts:
            if not env.is_resident(layer, expert):
                env.request(layer, expert, Priority.HIGH, self.chunked)
        return experts

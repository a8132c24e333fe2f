from dataclasses import dataclass

from promoe_bench.environment import Priority

from .base import Strategy


@dataclass
class LRUCache(Strategy):
    """Reactive per-layer LRU cache (mixtral-offloading style): a miss is copied when the router asks
    for it, in routing order, as one whole expert like mixtral-offloading's single-buffer copy;
    experts run in routing order. `lru[chunked=1]` lends it ProMoE's chunked copies."""

    name = "lru"
    summary = "reactive per-layer LRU cache; misses copied whole, in routing order, when the router asks"

    chunked: bool = False

    def on_router(self, env, layer, experts):
        for expert in experts:
            if not env.is_resident(layer, expert):
                env.request(layer, expert, Priority.HIGH, self.chunked)
        return experts

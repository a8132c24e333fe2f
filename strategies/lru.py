from dataclasses import dataclass

from promoe_bench.environment import Priority

from .base import Strategy


@dataclass
class LRUCache(Strategy):
    """Reactive per-layer LRU cache (mixtral-offloading style): a miss is copied when the router asks
    for it, in routing order; experts run in routing order."""

    name = "lru"
    summary = "reactive per-layer LRU cache; misses copied in routing order when the router asks"

    def on_router(self, env, layer, experts):
        for expert in experts:
            if not env.is_resident(layer, expert):
                env.request(layer, expert, Priority.HIGH)
        return experts

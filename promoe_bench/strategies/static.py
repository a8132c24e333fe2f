from dataclasses import dataclass

from promoe_bench.environment import Priority
from promoe_bench.policies import Static

from .base import Strategy


@dataclass
class StaticCache(Strategy):
    """The paper's static cache: each layer's most popular experts in a profiling pass (the recorded
    routing of this workload) stay pinned; `spare` slots take the misses, LRU among themselves."""

    name = "static"
    summary = "most popular experts of a profiling pass pinned per layer, plus spare slots for misses"

    spare: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.spare < 1:
            raise ValueError(f"spare must be at least 1 (misses need a slot), got {self.spare}")

    @property
    def needs_trace(self):
        return True

    def pinned(self, env, layer: int) -> list[int]:
        return env.trace.popularity(layer)[: max(env.shape.capacity - self.spare, 0)]

    def eviction_policy(self, env):
        return Static([set(self.pinned(env, layer)) for layer in range(env.shape.num_layers)])

    def setup(self, env):
        for layer in range(env.shape.num_layers):
            for expert in self.pinned(env, layer):
                env.request(layer, expert, Priority.HIGH)

    def on_router(self, env, layer, experts):
        for expert in experts:
            if not env.is_resident(layer, expert):
                env.request(layer, expert, Priority.HIGH, chunked=False)
        return experts

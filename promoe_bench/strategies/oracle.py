from dataclasses import dataclass

from promoe_bench.policies import Belady

from .promoe import ProMoE


@dataclass
class Oracle(ProMoE):
    """The bound: ProMoE's mechanism with perfect prediction (the routing recorded by a greedy pass of
    the same workload) and Belady's replacement (evict the expert needed farthest in the future)."""

    name = "oracle"
    summary = "perfect prediction and Belady replacement from the recorded routing: the bound"

    predictor: str = "oracle"

    @property
    def needs_trace(self):
        return True

    def eviction_policy(self, env):
        return Belady(env.trace)

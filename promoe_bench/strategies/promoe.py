from dataclasses import dataclass

from promoe_bench.environment import Priority
from promoe_bench.policies import ForwardRankedLRU

from .prefetch import Prefetching


@dataclass
class ProMoE(Prefetching):
    """ProMoE (arXiv 2410.22134): stride prefetch of predicted experts at LOW priority, chunked copies,
    early preemption of the layer's speculative copies once its router has chosen, and reordered
    execution (resident experts first, then those with the most chunks landed). Each part can be
    switched off for ablations: promoe[chunked=0], promoe[preempt=0], promoe[reorder=0]."""

    name = "promoe"
    summary = "ProMoE: learned stride prefetch (d=2), chunked copies, early preemption, reordered execution"

    preempt: bool = True  # drop the layer's LOW copies when its router has chosen
    reorder: bool = True  # run (and copy) resident experts first, then the most-landed ones

    def eviction_policy(self, env):
        # running the cached experts first must not decide which experts a prompt leaves cached
        return ForwardRankedLRU(env.shape.num_layers)

    def on_router(self, env, layer, experts):
        order = sorted(experts, key=lambda e: -env.chunks_ready(layer, e)) if self.reorder else experts
        for expert in order:  # the copy worker takes HIGH requests in this order
            if not env.is_resident(layer, expert):
                env.request(layer, expert, Priority.HIGH, self.chunked)  # a chosen prefetch keeps its chunks
        if self.preempt:  # what is still LOW for this layer was guessed wrong
            env.drop_pending(layer)
        return order

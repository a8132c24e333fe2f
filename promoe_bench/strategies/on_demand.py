from dataclasses import dataclass

from promoe_bench.environment import Priority

from .base import Strategy


@dataclass
class OnDemand(Strategy):
    """transformers-style offloading: copy the layer's routed experts (pinned, asynchronous), use them,
    free them. Nothing is reused."""

    name = "on_demand"
    summary = "copy each layer's routed experts every time, then free them (transformers-style offloading)"

    def on_router(self, env, layer, experts):
        for expert in experts:
            env.request(layer, expert, Priority.HIGH, chunked=False)  # whole modules, as transformers moves them
        return experts

    def after_layer(self, env, layer, experts):
        for expert in experts:
            env.evict(layer, expert)

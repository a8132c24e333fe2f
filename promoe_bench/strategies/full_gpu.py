from dataclasses import dataclass

from promoe_bench.environment import Priority

from .base import Strategy


@dataclass
class FullGPU(Strategy):
    """Every expert resident on the device from the start: no copies, the speed ceiling."""

    name = "full_gpu"
    summary = "every expert resident on the device; no copies after loading (the speed ceiling)"

    def capacity(self, num_experts, budgeted):
        return num_experts

    def setup(self, env):
        for layer in range(env.shape.num_layers):
            for expert in range(env.shape.num_experts):
                env.request(layer, expert, Priority.HIGH)

    def on_router(self, env, layer, experts):
        return experts

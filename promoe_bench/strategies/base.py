"""The contract every offload strategy keeps. A strategy is policy only: it talks to an Environment
(promoe_bench.environment) and never touches CUDA, threads or clocks, so the runtime and the simulator
run it unchanged."""

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from promoe_bench.environment import Environment
from promoe_bench.policies import LRU, EvictionPolicy
from promoe_bench.predictors import FROM_TRACE


@dataclass
class Strategy(ABC):
    """Subclasses are dataclasses: their fields are the parameters a user sets as `name[field=value]`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `promoe-bench strategies`

    cache_rate: float | None = None  # overrides the run's --cache-rate for this strategy
    gpu_memory: int | None = None  # overrides the run's --gpu-memory (bytes) for this strategy

    def __post_init__(self):
        if self.cache_rate is not None and not 0 < self.cache_rate <= 1:
            raise ValueError(f"cache_rate must be in (0, 1], got {self.cache_rate}")
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise ValueError(f"gpu_memory must be a positive number of bytes, got {self.gpu_memory}")

    def capacity(self, num_experts: int, budgeted: int) -> int:
        """Cache slots per layer, given how many the memory budget allows."""
        return budgeted

    @property
    def predictors(self) -> set[str]:
        """Predictors the strategy will ask the environment for (learned, gate, oracle, noisy)."""
        return set()

    @property
    def needs_trace(self) -> bool:
        """The strategy reads the workload's recorded routing (env.trace)."""
        return bool(self.predictors & set(FROM_TRACE))

    def targets(self, layer: int, num_layers: int) -> list[int]:
        """The later layers this strategy predicts from `layer`'s input."""
        return []

    def eviction_policy(self, env: Environment) -> EvictionPolicy:
        return LRU(env.shape.num_layers)

    def setup(self, env: Environment) -> None:
        """Before the first token: warm the cache if the strategy wants to."""

    def on_layer_input(self, env: Environment, layer: int) -> None:
        """The input of `layer` is known: the moment to predict and prefetch later layers."""

    @abstractmethod
    def on_router(self, env: Environment, layer: int, experts: list[int]) -> list[int]:
        """`layer`'s router chose `experts` (in routing order): request what is missing and return
        the order in which to run them (each exactly once)."""

    def after_layer(self, env: Environment, layer: int, experts: list[int]) -> None:
        """`layer` is done with `experts`."""

    @property
    def label(self) -> str:
        """The strategy as given on the command line, parameters included."""
        changed = [f for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
        params = [f"{f.name}={_show(getattr(self, f.name))}" for f in changed]
        return f"{self.name}[{','.join(params)}]" if params else self.name


def _show(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)

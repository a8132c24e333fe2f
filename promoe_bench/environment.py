"""The one interface between offload strategies and whatever runs them (the runtime and the simulator).

A strategy sees only this: no CUDA, threads or clocks. Layers are MoE layers, numbered 0..L-1.
"""

from dataclasses import dataclass
from typing import Protocol

from .copy_scheduler import Priority
from .trace import RoutingTrace

__all__ = ["Environment", "ModelShape", "Priority"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int  # MoE layers
    num_experts: int  # routed experts per layer
    top_k: int
    expert_bytes: int
    capacity: int  # cache slots per layer for this run


class Environment(Protocol):
    shape: ModelShape
    trace: "RoutingTrace | None"  # the workload's recorded routing, given to strategies that need it

    def is_resident(self, layer: int, expert: int) -> bool:
        """Every chunk of the expert is in its device slot."""

    def chunks_ready(self, layer: int, expert: int) -> int:
        """How many of the expert's 3 chunks (gate, up, down) have landed: 0 when not cached."""

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        """Copy the expert into the layer's cache unless it is there or on its way; HIGH promotes a
        pending LOW request. A LOW request of a resident expert counts as a use for eviction."""

    def drop_pending(self, layer: int) -> int:
        """Forget the layer's LOW requests not yet copied; returns how many were dropped."""

    def evict(self, layer: int, expert: int) -> None:
        """Free the expert's slot now (ignored while it is being copied or used)."""

    def predict(self, layer: int, target: int, predictor: str, min_prob: float = 0.0,
                recall: float = 1.0) -> list[int]:
        """From `layer`'s input (known since on_layer_input), the experts `predictor` (learned, gate,
        oracle or noisy) expects `target` > `layer` to route in this step, the surest first; per-token
        guesses below `min_prob` are left out (the oracle's are certain); `recall`: noisy's."""

    def position(self, layer: int) -> int:
        """How many forwards of `layer` have been routed so far (for policies that read the trace)."""

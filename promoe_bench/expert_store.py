"""Host-side home of every expert: one contiguous buffer per expert, a view per matrix (chunk).

An expert is stored as three chunks in a fixed order, gate, up, down, each its weight followed by its
bias when the family has biases. Weights keep the orientation the family's experts module computes with
(`[out, in]` for F.linear, `[in, out]` when `is_transposed`), so compute needs no reshuffling.
"""

import functools
from dataclasses import dataclass

import torch

CHUNK_NAMES = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one expert's three chunks, shared by every expert of the model."""

    hidden: int  # H
    intermediate: int  # I
    transposed: bool  # weights are [in, out] (x @ W) instead of [out, in] (F.linear)
    has_bias: bool
    dtype: torch.dtype

    def weight_shape(self, chunk: int) -> tuple[int, int]:
        out_in = (self.intermediate, self.hidden) if chunk < 2 else (self.hidden, self.intermediate)
        return out_in[::-1] if self.transposed else out_in

    def bias_numel(self, chunk: int) -> int:
        if not self.has_bias:
            return 0
        return self.intermediate if chunk < 2 else self.hidden

    def chunk_numel(self, chunk: int) -> int:
        rows, cols = self.weight_shape(chunk)
        return rows * cols + self.bias_numel(chunk)

    @property
    def numel(self) -> int:
        return sum(self.chunk_numel(c) for c in range(3))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return self._bounds[chunk]

    @functools.cached_property
    def _bounds(self) -> tuple[tuple[int, int], ...]:
        # worked out once: the copy worker asks for a chunk's range twice per chunk it moves
        ends = [sum(self.chunk_numel(c) for c in range(chunk + 1)) for chunk in range(3)]
        return tuple(zip([0, *ends[:2]], ends, strict=True))

    def chunk_views(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) views into one expert's flat buffer `flat` [numel]."""
        views = []
        for chunk in range(3):
            start, end = self.chunk_bounds(chunk)
            rows, cols = self.weight_shape(chunk)
            weight = flat[start : start + rows * cols].view(rows, cols)
            bias = flat[start + rows * cols : end] if self.has_bias else None
            views.append((weight, bias))
        return views


class ExpertStore:
    """All experts of all MoE layers in host memory, pinned when copies go to a CUDA device.

    One buffer per layer holds that layer's experts back to back, so each expert is one contiguous
    range (a copy can move it whole) and each chunk is a contiguous sub-range (or one matrix at a time).
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin: bool):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._layers: list[torch.Tensor | None] = [None] * num_layers
        self._pin = pin

    def allocate_layer(self, layer: int) -> torch.Tensor:
        """Empty buffer [E, numel] for one layer; filled by the checkpoint reader."""
        buffer = torch.empty(self.num_experts, self.layout.numel, dtype=self.layout.dtype, pin_memory=self._pin)
        self._layers[layer] = buffer
        return buffer

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        buffer = self._layers[layer]
        assert buffer is not None, f"layer {layer} of the expert store was never filled"
        return buffer[expert]

    def chunk(self, layer: int, expert: int, chunk: int) -> torch.Tensor:
        start, end = self.layout.chunk_bounds(chunk)
        return self.expert(layer, expert)[start:end]

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_experts * self.layout.nbytes

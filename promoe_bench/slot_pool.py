"""Preallocated device memory for cached experts: a fixed number of expert-sized slots.

Allocated once when a strategy starts; a miss reuses a slot, never allocates.
"""

import torch

from .expert_store import ExpertLayout


class SlotPool:
    def __init__(self, num_slots: int, layout: ExpertLayout, device: torch.device):
        self.layout = layout
        self.device = device
        self.buffer = torch.empty(num_slots, layout.numel, dtype=layout.dtype, device=device)
        self._views = [layout.chunk_views(self.buffer[slot]) for slot in range(num_slots)]
        # gate and up as one [2I, H] matrix when they lie back to back (no bias, not transposed), so one matmul
        # computes both exactly as transformers' experts do; made once, read for every expert computed
        fused = not (layout.has_bias or layout.transposed)
        self._fused = [self.buffer[slot, : 2 * layout.intermediate * layout.hidden].view(-1, layout.hidden)
                       if fused else None for slot in range(num_slots)]
        # On CUDA, the stream compute reads slots on, and per slot the event after the last compute queued
        # there that read it: a copy into the slot must wait for it.
        self._compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._released = [None] * num_slots

    def chunk(self, slot: int, chunk: int) -> torch.Tensor:
        start, end = self.layout.chunk_bounds(chunk)
        return self.buffer[slot, start:end]

    def views(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of gate, up, down."""
        return self._views[slot]

    def fused_gate_up(self, slot: int) -> torch.Tensor | None:
        """Gate and up as one [2I, H] matrix, where the layout allows."""
        return self._fused[slot]

    def mark_released(self, slots) -> None:
        """Compute queued so far is all that reads `slots` (one event for all of them)."""
        if self._compute is not None:
            event = torch.cuda.Event()
            event.record(self._compute)
            for slot in slots:
                self._released[slot] = event

    def released_event(self, slot: int):
        return self._released[slot]

"""Host-side home of every expert: one contiguous buffer per expert, a view per matrix (chunk).

An expert is stored as three chunks in a fixed order, gate, up, down, each its weight followed by its
bias when the family has biases. Weights keep the orientation the family's experts module computes with
(`[out, in]` for F.linear, `[in, out]` when `is_transposed`), so compute needs no reshuffling.
"""

import functools
import mmap
import weakref
from dataclasses import dataclass

import torch

from .errors import UsageError

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

    Each buffer is an anonymous private mapping of exactly the layer's bytes, page-aligned, which the
    CUDA runtime registers (page-locks in place) when `pin`. torch's pinned allocator is avoided: it
    rounds every block up to a power of two, so a 2.82 GB Mixtral layer would take 4 GiB of pinned
    memory (137 GB for 90 GB of experts). Registrations are undone when the store is dropped.
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin: bool):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._layers: list[torch.Tensor | None] = [None] * num_layers
        # (pointer, mapping) per registered layer. The finalizer holds this list, so no mapping can be
        # unmapped before its registration is undone, whatever order the store and its tensors die in.
        self._registered: list[tuple[int, mmap.mmap]] = []
        # only on the CUDA path: on a CPU build torch.cuda.cudart() fails, and CUDA is not initialised
        self._cudart = torch.cuda.cudart() if pin else None
        if pin:
            weakref.finalize(self, _unregister, self._cudart, self._registered)

    def allocate_layer(self, layer: int) -> torch.Tensor:
        """Empty buffer [E, numel] for one layer, registered with CUDA when pinned; filled by the
        checkpoint reader."""
        assert self._layers[layer] is None, f"layer {layer} of the expert store is already allocated"
        nbytes = self.num_experts * self.layout.nbytes
        # A mapping on the CPU too: glibc serves any allocation over 32 MiB (a real layer's are GBs) with
        # an anonymous mapping anyway, so it costs the same, and CPU runs exercise the very buffers CUDA
        # registers. Pages stay unbacked until filled, so loading still holds one checkpoint, not two.
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = torch.frombuffer(mapping, dtype=self.layout.dtype).view(self.num_experts, self.layout.numel)
        if self._cudart is not None:
            # flags 0 (cudaHostRegisterDefault): page-locked in place, so copies from it are asynchronous
            # DMA; registers exactly nbytes, the page-aligned start makes the pinned pages the mapping's
            code = int(self._cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0))
            if code != 0:
                name = self._cudart.cudaGetErrorString(self._cudart.cudaError(code))
                raise UsageError(
                    f"cannot pin {nbytes} bytes ({nbytes / 1e9:.2f} GB) of host memory for MoE layer {layer}'s "
                    f"experts: cudaHostRegister returned {name} (cudaError {code}); all layers need "
                    f"{self.nbytes / 1e9:.2f} GB pinned, so the host needs that much free memory to page-lock")
            self._registered.append((buffer.data_ptr(), mapping))
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

    @property
    def pinned(self) -> bool:
        """Whether layers are registered with CUDA as they are allocated (copies go to a CUDA device)."""
        return self._cudart is not None

    @property
    def pinned_bytes(self) -> int:
        """Bytes registered with CUDA so far: the experts' bytes once every layer is allocated, 0 unpinned."""
        return sum(len(mapping) for _, mapping in self._registered)


def _unregister(cudart, registered: list[tuple[int, mmap.mmap]]) -> None:
    """Undo every registration of a store (its finalizer); the mappings are released after this returns."""
    failed = [code for pointer, _ in registered if (code := int(cudart.cudaHostUnregister(pointer))) != 0]
    assert not failed, f"cudaHostUnregister failed with cudaError {failed}"

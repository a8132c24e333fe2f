"""The expert store's host memory: exactly the experts' bytes, registered with CUDA in place when pinned,
unregistered when the store is dropped. A fake CUDA runtime stands in for torch.cuda.cudart() on the CPU.
"""

import dataclasses
import gc
import mmap
from pathlib import Path

import pytest
import torch

from promoe_bench.bench import _model_info
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.errors import UsageError
from promoe_bench.expert_store import ExpertLayout, ExpertStore

# 3 experts of 46,912 bytes: 140,736 bytes a layer, neither a power of two nor a whole number of pages
LAYOUT = ExpertLayout(hidden=48, intermediate=80, transposed=False, has_bias=True, dtype=torch.float32)
NUM_LAYERS, NUM_EXPERTS = 4, 3
LAYER_BYTES = NUM_EXPERTS * LAYOUT.nbytes
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713


def mapped_ranges() -> list[tuple[int, int]]:
    """[start, end) of every mapping of this process."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = line.split()[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


class FakeCudart:
    """torch.cuda.cudart()'s registration calls, recorded; a registration fails with `fail_with` when set.
    Like the real runtime, unregistering a pointer that is not registered is an error."""

    cudaError = int  # the binding's enum of error codes; the fake's codes are plain ints

    def __init__(self, fail_with: int = 0):
        self.fail_with = fail_with
        self.registered: dict[int, int] = {}  # pointer -> bytes, while registered
        self.registrations: list[tuple[int, int, int]] = []  # (pointer, bytes, flags), every call
        self.unregistered: list[int] = []
        self.mapped_when_unregistered: list[bool] = []

    def cudaHostRegister(self, pointer: int, nbytes: int, flags: int) -> int:
        if self.fail_with:
            return self.fail_with
        self.registrations.append((pointer, nbytes, flags))
        self.registered[pointer] = nbytes
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        if self.registered.pop(pointer, None) is None:
            return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        self.unregistered.append(pointer)
        self.mapped_when_unregistered.append(any(start <= pointer < end for start, end in mapped_ranges()))
        return 0

    @staticmethod
    def cudaGetErrorString(code: int) -> str:
        return {CUDA_ERROR_MEMORY_ALLOCATION: "out of memory"}.get(code, "unknown error")


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def filled_store(pin: bool) -> ExpertStore:
    """A store whose every value names its layer and expert."""
    store = ExpertStore(LAYOUT, NUM_LAYERS, NUM_EXPERTS, pin=pin)
    for layer in range(NUM_LAYERS):
        buffer = store.allocate_layer(layer)
        for expert in range(NUM_EXPERTS):
            buffer[expert] = 1000 * layer + expert + torch.arange(LAYOUT.numel) * 1e-3
    return store


def test_pinned_store_registers_exactly_the_experts_bytes_page_aligned(cudart):
    store = filled_store(pin=True)
    assert [nbytes for _, nbytes, _ in cudart.registrations] == [LAYER_BYTES] * NUM_LAYERS
    assert sum(cudart.registered.values()) == store.nbytes == NUM_LAYERS * LAYER_BYTES
    assert all(pointer % mmap.PAGESIZE == 0 for pointer in cudart.registered), "a registration is not page-aligned"
    assert {flags for _, _, flags in cudart.registrations} == {0}
    assert store.pinned and store.pinned_bytes == store.nbytes


def test_pinned_buffers_are_the_registered_memory_and_keep_their_data(cudart):
    store = filled_store(pin=True)
    gc.collect()  # the buffers allocate_layer returned are gone: the store alone keeps the memory
    for layer in range(NUM_LAYERS):
        assert store.expert(layer, 0).data_ptr() in cudart.registered
        for expert in range(NUM_EXPERTS):
            want = 1000 * layer + expert + torch.arange(LAYOUT.numel) * 1e-3
            assert torch.equal(store.expert(layer, expert), want), f"layer {layer} expert {expert} lost its data"
    start, end = LAYOUT.chunk_bounds(2)
    assert torch.equal(store.chunk(3, 1, 2), store.expert(3, 1)[start:end])


def test_dropping_a_pinned_store_unregisters_everything_while_still_mapped(cudart):
    store = filled_store(pin=True)
    registered = set(cudart.registered)
    gc.disable()  # the store must be unregistered when its last reference goes, not by a collection
    try:
        del store
        assert sorted(cudart.unregistered) == sorted(registered) and len(registered) == NUM_LAYERS
    finally:
        gc.enable()
    assert not cudart.registered
    assert all(cudart.mapped_when_unregistered), "memory was unmapped before its registration was undone"


def test_a_failed_registration_is_a_clear_error_naming_the_size(cudart):
    cudart.fail_with = CUDA_ERROR_MEMORY_ALLOCATION
    store = ExpertStore(LAYOUT, NUM_LAYERS, NUM_EXPERTS, pin=True)
    with pytest.raises(UsageError, match=rf"cannot pin {LAYER_BYTES} bytes .* for MoE layer 0's experts: "
                                         r"cudaHostRegister returned out of memory \(cudaError 2\)"):
        store.allocate_layer(0)
    assert store.pinned_bytes == 0
    del store
    assert cudart.unregistered == [], "only registered memory may be unregistered"


def test_an_unpinned_store_never_touches_the_cuda_runtime(monkeypatch):
    def no_cuda():
        raise AssertionError("torch.cuda.cudart() called for an unpinned store")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    store = filled_store(pin=False)
    assert not store.pinned and store.pinned_bytes == 0
    assert torch.equal(store.expert(2, 1), 2001 + torch.arange(LAYOUT.numel) * 1e-3)
    del store


def test_run_json_records_pinned_bytes_against_the_experts_bytes(checkpoints, cudart):
    loaded = load_checkpoint(str(checkpoints["mixtral"]), torch.device("cpu"))
    cpu = _model_info(loaded)
    assert cpu["pinned_bytes"] is None and cpu["expert_store_bytes"] == loaded.store.nbytes
    assert cpu["unmeasured"] == {"pinned_bytes": "not pinned: copies go to the emulated link on the CPU"}

    # the same model on a CUDA device: the store registered with the (fake) runtime
    shape = loaded.store
    pinned = ExpertStore(shape.layout, shape.num_layers, shape.num_experts, pin=True)
    for layer in range(shape.num_layers):
        pinned.allocate_layer(layer)
    cuda = _model_info(dataclasses.replace(loaded, store=pinned))
    assert cuda["pinned_bytes"] == cuda["expert_store_bytes"] == shape.nbytes
    assert cuda["unmeasured"] == {}

"""What else the process does while a run is timed or a log replays: compute's intra-op threads, and
Python's garbage collector."""

import contextlib
import gc

import torch


def compute_threads(device: torch.device) -> int:
    """Threads for a run's compute. On the CPU, one core fewer than torch would take: that core is the
    emulated link's copy worker's, as a GPU's copy engine is hardware of its own. Without it the worker's
    memcpy and pacing take cores from compute, which charges every copy made while computing (prefetches
    above all) to the strategy's compute."""
    threads = torch.get_num_threads()
    return max(1, threads - 1) if device.type == "cpu" else threads


@contextlib.contextmanager
def torch_threads(count: int):
    """torch computes with `count` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def collector_held():
    """No automatic garbage collection inside the block: a full collection of a run's heap (its recorded
    rows and timelines) took up to 264 ms, inside whichever step it fell in. Collection resumes after the
    block, untimed, as allocations since then require."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

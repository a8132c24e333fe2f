"""Counts the calls that stop the host until a GPU catches up (a device-to-host read or a wait), on any device.

On a GPU each `nonzero`, `item`, `tolist`, `.cpu()`, truth test or data-dependent shape makes the host wait
for the device to catch up, so the host can no longer queue work ahead. On the CPU they cost nothing, which
is why they must be counted rather than timed:
- SyncAudit (any device): a TorchFunctionMode sees every such call as it is made;
- CudaSyncs (CUDA): torch's own sync debug mode warns of each synchronising CUDA call the host makes.
Each is charged to the code that made it.
"""

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import promoe_bench

PACKAGE = str(Path(promoe_bench.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
WARNINGS = warnings.__file__
# Tensor methods and functions that read device memory on the host, or size a result by the data. A
# `.to(device)` that lands on the host is not told apart here from one that stays on the device.
HOST_READS = {"tolist", "item", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__", "unique",
              "unique_consecutive", "masked_select", "bincount", "equal", "allclose"}


def _reads_the_device(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    if name in HOST_READS:
        return name
    if name == "where" and len(args) + len(kwargs) == 1:  # where(condition): nonzero
        return "where"
    if name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
        return "boolean index"
    if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor):
        return "repeat_interleave"
    return None


class SyncAudit(TorchFunctionMode):
    """`calls`: (caller, what) -> how many times, while the mode is on."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _reads_the_device(func, args, kwargs)
        if what is not None:
            self.calls[(_caller(), what)] += 1
        return func(*args, **kwargs)

    def by_caller(self) -> Counter:
        counts = Counter()
        for (caller, _), n in self.calls.items():
            counts[caller] += n
        return counts


def _caller() -> str:
    """Who made the call: the first frame on the stack outside torch, as module.function for promoe_bench's
    own code, else the package it lies in (transformers' mask building, say)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith((TORCH, WARNINGS)):
        frame = frame.f_back
    path = Path(frame.f_code.co_filename)
    if str(path).startswith(PACKAGE):
        return f"{path.stem}.{frame.f_code.co_name}"
    return next((part for part in reversed(path.parts[:-1]) if part == "transformers"), str(path))


class CudaSyncs(contextlib.AbstractContextManager):
    """`calls` as SyncAudit's, from torch.cuda.set_sync_debug_mode("warn") on `device`: what the driver really
    waits for (an event's synchronize on another thread, the copy worker's, is none of compute's)."""

    def __init__(self, device):
        self.device = device
        self.calls: Counter = Counter()
        self._caught = warnings.catch_warnings()

    def __enter__(self):
        self._caught.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return self._caught.__exit__(*exc)

    def _record(self, message, category, *args, **kwargs):
        if "synchronizing" in str(message):
            self.calls[(_caller(), "cuda sync")] += 1

    by_caller = SyncAudit.by_caller


class StepSyncs:
    """Per step of `runtime`, the syncs `audit` counted and the predictions made from hidden states (each of
    which must read its guesses once); `runtime`'s begin_step and predict are wrapped to know."""

    def __init__(self, runtime, audit):
        self.audit = audit
        self.marks: list[int] = []  # syncs so far as each step began
        self.predictions: list[int] = []  # per step
        begin_step, predict = runtime.begin_step, runtime.predict

        def counted_begin(**context):
            self.marks.append(sum(audit.calls.values()))
            self.predictions.append(0)
            begin_step(**context)

        def counted_predict(layer, target, predictor, *args):
            self.predictions[-1] += predictor in ("learned", "gate")
            return predict(layer, target, predictor, *args)

        runtime.begin_step, runtime.predict = counted_begin, counted_predict

    def per_step(self) -> list[int]:
        """Syncs in each step, the last one's up to now."""
        marks = [*self.marks, sum(self.audit.calls.values())]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

"""Per-layer, per-step measurements of one generation, taken with a clock that does not stall the device.

On CUDA a stamp is an event recorded on the compute stream, resolved once at the end of the step; on the
CPU it is perf_counter_ns. Records come out as plain dicts, one per (step, layer): the rows of layers.csv.
"""

import time
from dataclasses import dataclass

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if not self.cuda:
            return time.perf_counter_ns()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e-9
        return start.elapsed_time(end) * 1e-3  # elapsed_time is in ms; needs `end` to have completed

    def sync(self) -> None:
        """End of a timed region: the device has finished everything stamped so far."""
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class _LayerStamps:
    block_start: object = None
    router_end: object = None
    experts_end: object = None
    block_end: object = None
    stalls: list = None  # (start, end) pairs around waits for copies
    routed: tuple = ()  # distinct experts in routing order
    hits: int = 0


class StepRecorder:
    """Collects stamps during a forward; `finish_step` turns them into per-layer rows."""

    def __init__(self, clock: Clock, num_layers: int):
        self.clock = clock
        self.num_layers = num_layers
        self.rows: list[dict] = []
        self._layers: list[_LayerStamps] = []
        self._step_start = None
        self._context: dict = {}

    def begin_step(self, **context) -> None:
        self._context = context
        self._layers = [_LayerStamps(stalls=[]) for _ in range(self.num_layers)]
        self._step_start = self.clock.stamp()

    def block_start(self, layer: int) -> None:
        self._layers[layer].block_start = self.clock.stamp()

    def router_end(self, layer: int, routed: list[int], hits: int) -> None:
        stamps = self._layers[layer]
        stamps.router_end = self.clock.stamp()
        stamps.routed, stamps.hits = tuple(routed), hits

    def stall(self, layer: int, start, end) -> None:
        self._layers[layer].stalls.append((start, end))

    def experts_end(self, layer: int) -> None:
        self._layers[layer].experts_end = self.clock.stamp()

    def block_end(self, layer: int) -> None:
        self._layers[layer].block_end = self.clock.stamp()

    def finish_step(self, copies: list[int], nbytes: list[int], evictions: list[int]) -> float:
        """Resolve the step's stamps (after clock.sync()) into rows; returns the step's seconds."""
        step_end = self.clock.stamp()
        self.clock.sync()
        seconds = self.clock.seconds
        previous_end = self._step_start
        for layer, stamps in enumerate(self._layers):
            stall = sum(seconds(a, b) for a, b in stamps.stalls)
            self.rows.append(
                {
                    **self._context,
                    "layer": layer,
                    "non_expert_s": seconds(previous_end, stamps.block_start),
                    "router_s": seconds(stamps.block_start, stamps.router_end),
                    "expert_s": seconds(stamps.router_end, stamps.experts_end) - stall,
                    "stall_s": stall,
                    "routed": " ".join(map(str, stamps.routed)),
                    "hits": stamps.hits,
                    "misses": len(stamps.routed) - stamps.hits,
                    "copies": copies[layer],
                    "bytes": nbytes[layer],
                    "evictions": evictions[layer],
                }
            )
            previous_end = stamps.block_end
        return seconds(self._step_start, step_end)

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
    late: frozenset = frozenset()  # routed experts compute had to wait for
    predicted: tuple | None = None  # what a predictor guessed for this layer, when one did
    predict_s: float = 0.0  # spent predicting later layers from this layer's input


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

    def predicted(self, source: int, target: int, experts: list[int], seconds: float) -> None:
        earlier = self._layers[target].predicted or ()  # several sources may guess one target: the union
        self._layers[target].predicted = tuple(dict.fromkeys(earlier + tuple(experts)))
        self._layers[source].predict_s += seconds

    def experts_end(self, layer: int, late: set[int]) -> None:
        stamps = self._layers[layer]
        stamps.experts_end = self.clock.stamp()
        stamps.late = frozenset(late)

    def block_end(self, layer: int) -> None:
        self._layers[layer].block_end = self.clock.stamp()

    def finish_step(self, copies: list[int], nbytes: list[int], evictions: list[int], wasted: list[int]) -> float:
        """Resolve the step's stamps (after clock.sync()) into rows; returns the step's seconds."""
        step_end = self.clock.stamp()
        self.clock.sync()
        seconds = self.clock.seconds
        previous_end = self._step_start
        for layer, stamps in enumerate(self._layers):
            stall = sum(seconds(a, b) for a, b in stamps.stalls)
            predicted = set(stamps.predicted or ()) & set(stamps.routed)
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
                    "ready": len(stamps.routed) - len(stamps.late),
                    # prediction: blank when nothing predicted this layer in this step
                    "predicted": " ".join(map(str, stamps.predicted)) if stamps.predicted is not None else "",
                    "predicted_correct": len(predicted) if stamps.predicted is not None else None,
                    "predicted_ready": len(predicted - stamps.late) if stamps.predicted is not None else None,
                    "predict_s": stamps.predict_s,
                    "wasted_bytes": wasted[layer],
                }
            )
            previous_end = stamps.block_end
        return seconds(self._step_start, step_end)

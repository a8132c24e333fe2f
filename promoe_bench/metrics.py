"""Per-layer, per-step measurements of one generation, taken with a clock that does not stall the device.

On CUDA a stamp is an event recorded on a stream of the run's device, resolved once at the end of the
step; on the CPU it is perf_counter_ns. Two outputs:
- `rows`, one per (step, layer): the rows of layers.csv;
- `timeline`, one per event (columns `timeline.COLUMNS`): the rows of timeline.csv.gz.
With `detail=False` only the step's own start and end, and waits for copies, are stamped (layer
timings are blank and the timeline empty): what the instrumentation-overhead benchmark compares against.
"""

import math
import time

import pandas as pd
import torch

from .timeline import event


class Clock:
    """One time base for a run: stamps become seconds since the clock was made (`at`).

    On CUDA, a step's stamps are read against the step's own first stamp: CUDA gives event times as
    float32 milliseconds, which from the run's start would resolve only about 8 us after 100 s of run.
    Only where the step lies on the run's axis takes that rounding, never a span inside it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:  # every event of the run is placed from this one (events of any stream compare)
            self._stream = torch.cuda.current_stream(device)  # compute's
            self._origin = self.stamp()
            self._origin.synchronize()  # host sync, once per runtime: ties the host's clock to the device's
            self._step_origin, self._step_offset = self._origin, 0.0
        # host times (when a copy was queued) use this origin; on CUDA it is the origin event's moment,
        # give or take the microseconds of a synchronize
        self.host_origin_ns = time.perf_counter_ns()

    def stamp(self, stream=None):
        """Now, on compute's stream (or `stream`, of the same device)."""
        if not self.cuda:
            return time.perf_counter_ns()
        stamp = torch.cuda.Event(enable_timing=True)
        stamp.record(stream or self._stream)
        return stamp

    def begin_step(self):
        """The step's first stamp, which its other stamps are read against."""
        stamp = self.stamp()
        if self.cuda:
            self._step_origin = stamp
        return stamp

    def end_step(self, end) -> None:
        """The step ended with stamp `end`: wait until it has completed, so that every stamp of the step
        (compute's, and the chunks it waited for) can be read. Copies still on the link are not waited for."""
        if self.cuda:
            end.synchronize()  # host sync: a step's times are known once the step is done, once per step
            self._step_offset = self._origin.elapsed_time(self._step_origin) * 1e-3

    def at(self, stamp) -> float:
        """Seconds since the origin; a CUDA stamp must have completed (after `end_step`), and may lie
        before the step's origin (a copy that started in an earlier step)."""
        if not self.cuda:
            return (stamp - self.host_origin_ns) * 1e-9
        return self._step_offset + self._step_origin.elapsed_time(stamp) * 1e-3  # elapsed_time is in ms

    def host_at(self, perf_counter_ns: int) -> float:
        return (perf_counter_ns - self.host_origin_ns) * 1e-9


class _LayerStamps:
    """One layer's stamps and facts in the current step (a plain class: a simulator makes millions)."""

    __slots__ = ("block_start", "router_end", "experts_end", "block_end", "waits", "experts", "predictions",
                 "routed", "hits", "predicted", "predict_s", "occupied_bytes")

    def __init__(self):
        self.block_start = self.router_end = self.experts_end = self.block_end = None
        self.waits: list = []  # (expert, start, end): compute reached a wait for a copy at start, went on at end
        self.experts: list = []  # (expert, start, end) of each expert's compute
        self.predictions: list = []  # (target, start, end) of predictions made from here
        self.routed: tuple = ()  # distinct experts in routing order
        self.hits = 0
        self.predicted: tuple | None = None  # what a predictor guessed for this layer, when one did
        self.predict_s = 0.0  # spent predicting later layers from this layer's input (host time)
        self.occupied_bytes = 0  # bytes of cache slots in use when the layer's experts were done


ROW_COLUMNS = ("layer", "non_expert_s", "router_s", "expert_s", "stall_s", "routed", "hits", "misses", "copies",
               "bytes", "evictions", "ready", "predicted", "predicted_correct", "predicted_ready", "predict_s",
               "wasted_bytes")


class StepRecorder:
    """Collects stamps during a forward; `finish_step` turns them into per-layer rows and timeline events."""

    def __init__(self, clock: Clock, num_layers: int, detail: bool = True):
        self.clock = clock
        self.num_layers = num_layers
        self.detail = detail
        self._rows: list[tuple] = []  # (context, *ROW_COLUMNS values), see `rows`
        self._timeline: list[tuple] = []  # (context, row) pairs; rows become dicts in `timeline` only
        self._layers: list[_LayerStamps] = []
        self._step_start = None
        self._context: dict = {}

    def stamp(self, stream=None):
        """A detail stamp (on compute's stream, or `stream`): None when only steps are timed."""
        return self.clock.stamp(stream) if self.detail else None

    def begin_step(self, **context) -> None:
        self._context = context
        self._layers = [_LayerStamps() for _ in range(self.num_layers)]
        self._step_start = self.clock.begin_step()

    def block_start(self, layer: int) -> None:
        self._layers[layer].block_start = self.stamp()

    def router_end(self, layer: int, routed: list[int], hits: int) -> None:
        stamps = self._layers[layer]
        stamps.router_end = self.stamp()
        stamps.routed, stamps.hits = tuple(routed), hits

    def waited(self, layer: int, expert: int, start, end) -> None:
        """Compute reached a wait for a copy of `expert` at stamp `start` and could go on at `end` (on a
        device, the chunk's landing: compute stalled only if that came after `start`)."""
        self._layers[layer].waits.append((expert, start, end))

    def expert(self, layer: int, expert: int, start):
        """`expert` computed from stamp `start` until now; returns now's stamp (the next expert's start)."""
        end = self.stamp()
        if self.detail:
            self._layers[layer].experts.append((expert, start, end))
        return end

    def predicted(self, source: int, target: int, experts: list[int], seconds: float, start=None, end=None) -> None:
        earlier = self._layers[target].predicted or ()  # several sources may guess one target: the union
        self._layers[target].predicted = tuple(dict.fromkeys(earlier + tuple(experts)))
        self._layers[source].predict_s += seconds
        if self.detail:
            self._layers[source].predictions.append((target, start, end))

    def experts_end(self, layer: int, occupied_bytes: int) -> None:
        stamps = self._layers[layer]
        stamps.experts_end = self.stamp()
        stamps.occupied_bytes = occupied_bytes

    def block_end(self, layer: int) -> None:
        self._layers[layer].block_end = self.stamp()

    def finish_step(self, copies: list[int], nbytes: list[int], evictions: list[int], wasted: list[int],
                    chunks: list[dict] = ()) -> float:
        """Resolve the step's stamps into rows (one device sync); `chunks` are the copy engine's records
        of chunks landed since the previous step. Returns the step's seconds."""
        step_end = self.clock.stamp()
        self.clock.end_step(step_end)
        at = self.clock.at
        step_start = at(self._step_start)

        def span(start, end) -> float:
            return at(end) - at(start) if start is not None and end is not None else math.nan

        previous_end = self._step_start
        for layer, stamps in enumerate(self._layers):
            stalls = [(expert, max(span(start, end), 0.0)) for expert, start, end in stamps.waits]
            stall = sum(seconds for _, seconds in stalls)
            late = {expert for expert, seconds in stalls if seconds > 0}  # routed experts compute waited for
            routed, predicted = stamps.routed, stamps.predicted
            right = set(predicted) & set(routed) if predicted is not None else None
            # a tuple per row (dicts only when asked for): a simulator makes millions of rows
            self._rows.append((self._context, layer, span(previous_end, stamps.block_start),
                               span(stamps.block_start, stamps.router_end),
                               span(stamps.router_end, stamps.experts_end) - stall, stall, routed, stamps.hits,
                               len(routed) - stamps.hits, copies[layer], nbytes[layer], evictions[layer],
                               len(routed) - len(late), predicted,
                               len(right) if right is not None else None,
                               len(right - late) if right is not None else None, stamps.predict_s,
                               wasted[layer]))
            if self.detail:
                self._layer_events(layer, stamps, previous_end)
            previous_end = stamps.block_end
        step = self._context.get("step")
        if self.detail:
            self._event(step, None, "compute", "head", at(previous_end), at(step_end))  # final norm, LM head
            for chunk in chunks:
                chunk.update(step=step, start_s=at(chunk["start_s"]), end_s=at(chunk["end_s"]),
                             queued_s=self.clock.host_at(chunk["queued_s"]))
                self._timeline.append((self._context, chunk))
        self._event(step, None, "compute", "step", step_start, at(step_end))
        return at(step_end) - step_start

    @property
    def rows(self) -> list[dict]:
        """One dict per (step, layer): the run context, then ROW_COLUMNS (the columns of layers.csv)."""
        return self.rows_frame().to_dict("records")

    def rows_frame(self) -> pd.DataFrame:
        if not self._rows:
            return pd.DataFrame()
        contexts = pd.DataFrame([row[0] for row in self._rows])
        values = pd.DataFrame([row[1:] for row in self._rows], columns=ROW_COLUMNS)
        for column in ("routed", "predicted"):  # experts as space-separated ids; blank when nothing guessed
            values[column] = [" ".join(map(str, experts)) if experts is not None else ""
                              for experts in values[column]]
        return pd.concat([contexts, values], axis=1)

    @property
    def timeline(self) -> list[dict]:
        """Every event so far as a row: the run context, then `timeline.COLUMNS`. Read it once the run is
        over: a copy's `preempted` is whether its task was ever dropped, which may happen after it landed."""
        rows = []
        for context, row in self._timeline:
            if isinstance(row, tuple):
                row = event(*row[:6], **row[6])
            elif "task" in row:  # a copy chunk
                row = {key: value for key, value in row.items() if key != "task"} | {"preempted": row["task"].dropped}
            rows.append({**context, **row})
        return rows

    def _event(self, step, layer, lane, kind, start, end, **fields) -> None:
        # kept as a tuple until asked for: building dicts here would cost the step several per cent
        self._timeline.append((self._context, (step, layer, lane, kind, start, end, fields)))

    def _layer_events(self, layer: int, stamps: _LayerStamps, previous_end) -> None:
        at, step = self.clock.at, self._context.get("step")
        self._event(step, layer, "compute", "non_expert", at(previous_end), at(stamps.block_start))
        self._event(step, layer, "compute", "moe", at(stamps.block_start), at(stamps.block_end))
        self._event(step, layer, "compute", "router", at(stamps.block_start), at(stamps.router_end))
        for expert, start, end in stamps.experts:
            self._event(step, layer, "compute", "expert", at(start), at(end), expert=expert)
        for _, start, end in stamps.waits:
            start_s, end_s = at(start), at(end)
            if end_s > start_s:  # on a device, a wait for a chunk that had landed by then took no time
                self._event(step, layer, "compute", "stall", start_s, end_s)
        for target, start, end in stamps.predictions:
            self._event(step, layer, "predictor", "predict", at(start), at(end), target=target)
        end = at(stamps.experts_end)
        self._event(step, layer, "cache", "occupancy", end, end, bytes=stamps.occupied_bytes)

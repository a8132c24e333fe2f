"""A run's timeline as Chrome trace event JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

One process per strategy, shifted so that each starts at 0 (strategies line up for comparison), with
a thread per lane: compute, predictor, copy. Slices are complete ("X") events in microseconds; copy
chunks carry expert, layer, priority, bytes, queue time and preemption in args. Counter tracks: copy
bytes in flight (requested and not yet landed), cache occupancy, and the hardware samples the run took
(GPU memory, PCIe throughput, or the process's RSS on the CPU).
"""

import pandas as pd

from .errors import UsageError

THREADS = {"compute": 1, "predictor": 2, "copy": 3}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)  # whole nanoseconds: equal stamps stay equal, so nesting survives


def _slice_name(row) -> str:
    if row.kind == "step":
        return f"step {row.step} ({row.phase})"
    if row.kind == "chunk":
        return f"L{row.layer} E{row.expert} {row.priority}"
    if row.kind == "predict":
        return f"predict L{row.layer}->L{row.target}"
    if row.kind == "expert":
        return f"expert {row.expert}"
    if row.kind in ("non_expert", "moe"):
        return f"L{row.layer} {row.kind.replace('_', '-')}"
    return row.kind


def _args(row) -> dict:
    args = {"step": int(row.step), "batch": int(row.batch)}
    if pd.notna(row.layer):
        args["layer"] = int(row.layer)
    if row.kind == "chunk":
        args.update(expert=int(row.expert), priority=row.priority, bytes=int(row.bytes),
                    queued_ms=round((row.start_s - row.queued_s) * 1e3, 3), preempted=bool(row.preempted))
    elif pd.notna(row.expert):
        args["expert"] = int(row.expert)
    if pd.notna(row.target):
        args["target"] = int(row.target)
    return args


def _in_flight(copies: pd.DataFrame, origin: float) -> list[tuple[float, int]]:
    """(time, bytes) steps of the copy bytes in flight: a chunk counts from its request until it lands."""
    changes = pd.concat([pd.DataFrame({"t": copies["queued_s"], "d": copies["bytes"]}),
                         pd.DataFrame({"t": copies["end_s"], "d": -copies["bytes"]})])
    changes = changes.groupby("t", sort=True)["d"].sum().cumsum()
    return [(_us(t - origin), int(v)) for t, v in changes.items()]


def chrome_trace(timeline: pd.DataFrame, samples: pd.DataFrame | None = None) -> dict:
    """`timeline`: the selected rows of a run's timeline; `samples`: the hardware samples of the same
    strategies (columns strategy, t_s and one column per counter), or None."""
    events: list[dict] = []
    for pid, (strategy, rows) in enumerate(timeline.groupby("strategy", sort=False), start=1):
        timed = rows[rows["lane"].isin(list(THREADS))]
        origin = min(timed["start_s"].min(), rows["queued_s"].min(skipna=True))  # a copy may be asked for earlier
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": strategy}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
        for lane, tid in THREADS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}})
        slices = []
        for row in timed.itertuples(index=False):
            start, end = _us(row.start_s - origin), _us(row.end_s - origin)
            slices.append({"ph": "X", "name": _slice_name(row), "cat": row.lane, "pid": pid,
                           "tid": THREADS[row.lane], "ts": start, "dur": round(end - start, 3), "args": _args(row)})
        slices.sort(key=lambda e: (e["tid"], e["ts"], -e["dur"]))  # parents before their children
        events += slices
        copies = rows[rows["lane"] == "copy"]
        if not copies.empty:
            events += [{"ph": "C", "name": "copy bytes in flight", "pid": pid, "ts": t, "args": {"bytes": v}}
                       for t, v in _in_flight(copies, origin)]
        for row in rows[rows["lane"] == "cache"].itertuples(index=False):
            events.append({"ph": "C", "name": "cache occupancy", "pid": pid, "ts": _us(row.start_s - origin),
                           "args": {"bytes": int(row.bytes)}})
        if samples is not None:
            events += _sample_counters(samples[samples["strategy"] == strategy], pid, origin, rows)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# cumulative byte counters of the samples, shown as the rate between one sample and the next
RATES = {"pcie_h2d_bytes": "PCIe host-to-device GB/s", "pcie_d2h_bytes": "PCIe device-to-host GB/s",
         "link_bytes": "link GB/s"}
SKIPPED = {"energy_j"}  # a total since the driver loaded: power_w is its track


def _sample_counters(samples: pd.DataFrame, pid: int, origin: float, rows: pd.DataFrame) -> list[dict]:
    """The hardware samples taken while the selected rows ran, one counter track per measured column."""
    window = samples[(samples["t_s"] >= rows["start_s"].min()) & (samples["t_s"] <= rows["end_s"].max())]
    events = []
    for column in window.columns.drop(["strategy", "t_s", *SKIPPED], errors="ignore"):
        measured = window[["t_s", column]].dropna().sort_values("t_s")
        name, values = column, measured[column]
        if column in RATES:
            name, values = RATES[column], values.diff() / measured["t_s"].diff() / 1e9
        events += [{"ph": "C", "name": name, "pid": pid, "ts": _us(t - origin), "args": {name: float(v)}}
                   for t, v in zip(measured["t_s"], values, strict=True) if pd.notna(v)]
    return events


def select(timeline: pd.DataFrame, strategy: str | None, repeat: int | None, steps: slice,
           max_events: int) -> tuple[pd.DataFrame, str | None]:
    """The rows to export: one strategy or all, one repeat (default: the first measured one), steps in
    the `steps` range; then whole (batch, step) units in run order while they fit under `max_events`.
    Returns the rows and a note when the cap cut steps off."""
    if strategy is not None:
        labels = list(dict.fromkeys(timeline["strategy"]))
        if strategy not in labels:
            raise UsageError(f"--strategy {strategy!r} is not in this run; it has {', '.join(labels)}")
        timeline = timeline[timeline["strategy"] == strategy]
    if repeat is None:
        measured = timeline[~timeline["warmup"].astype(bool)]
        repeat = int((measured if not measured.empty else timeline)["repeat"].min())
    elif repeat not in set(timeline["repeat"]):
        raise UsageError(f"--repeat {repeat} is not in this run; it has {sorted(set(timeline['repeat']))}")
    chosen = timeline[timeline["repeat"] == repeat]
    in_range = chosen["step"].between(steps.start or 0, (steps.stop if steps.stop is not None else 2**62) - 1)
    chosen = chosen[in_range]
    if chosen.empty:
        raise UsageError(f"no steps in {steps.start or 0}:{'' if steps.stop is None else steps.stop} "
                         f"(the run's steps are 0-{int(timeline['step'].max())})")
    units = chosen.groupby(["batch", "step"], sort=True).size()  # rows per (batch, step), all strategies
    kept = units[units.cumsum() <= max_events]
    if len(kept) == len(units):
        return chosen, None
    if kept.empty:
        raise UsageError(f"the first selected step has {units.iloc[0]} events (all strategies), more than "
                         f"--max-events {max_events}; raise it or pick one --strategy")
    keys = pd.MultiIndex.from_frame(chosen[["batch", "step"]])
    note = (f"kept the first {len(kept)} of {len(units)} (batch, step) units to stay under {max_events} events; "
            f"choose others with --steps or raise --max-events")
    return chosen[keys.isin(kept.index)], note


def parse_steps(text: str) -> slice:
    """'A:B' (B excluded), 'A:', ':B' or 'A' (that step alone)."""
    try:
        if ":" not in text:
            return slice(int(text), int(text) + 1)
        start, stop = text.split(":")
        bounds = slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected A:B, A:, :B or A with whole numbers") from None
    if (bounds.start or 0) < 0 or (bounds.stop is not None and bounds.stop <= (bounds.start or 0)):
        raise UsageError(f"--steps {text!r}: expected 0 <= A < B")
    return bounds

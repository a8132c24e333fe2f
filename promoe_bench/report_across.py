"""The report's figures across runs: how strategies move when the runs differ in one parameter (a sweep), and
runs of one setup made at different commits, side by side."""

import json

import pandas as pd

from .report_data import Run, label_parts, latency, strip_param


def sweep_values(run: Run, label: str) -> dict[str, object]:
    """The parameters a sweep may vary, for one series: cache rate (its label's, else the run's), batch size
    and hardware (a simulated profile, else the GPU's name or the CPU)."""
    config = run.meta["config"]
    rates = config.get("cache_rates") or [config.get("cache_rate")]
    rate = label_parts(label)[1].get("cache_rate")
    workload = config.get("workload")
    gpu = run.meta.get("environment", {}).get("gpu", {}).get("name")
    if config.get("gpu_memory"):  # a byte budget, not a rate
        rates = [None]
    return {"cache rate": float(rate) if rate is not None else (rates[0] if len(rates) == 1 else None),
            "batch size": workload.get("batch_size") if isinstance(workload, dict) else None,
            "hardware": config.get("hardware") if run.simulated else (gpu or "cpu")}


def sweeps(runs: list[Run]) -> pd.DataFrame:
    """For each parameter that differs between series: per series its value (x), the line it belongs to
    (its strategy without that parameter, and the other swept parameters), and TTFT / TPOT median and CI."""
    values = pd.DataFrame([{"series": run.prefix + label, "strategy": label, **sweep_values(run, label)}
                           for run in runs for label in run.labels])
    swept = [p for p in ("cache rate", "batch size", "hardware") if values[p].dropna().nunique() > 1]
    stats = latency(runs)
    frames = []
    for param in swept:
        points = values[values[param].notna()]
        others = [p for p in swept if p != param]
        line = [(strip_param(row.strategy, "cache_rate") if param == "cache rate" else row.strategy)
                + "".join(f", {p} {row[p]}" for p in others) for _, row in points.iterrows()]
        points = points.assign(parameter=param, x=points[param], line=line)[
            ["series", "strategy", "parameter", "x", "line"]]
        frames.append(points.merge(stats[["series", "metric", "median", "ci_low", "ci_high"]], on="series"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def setup_key(run: Run) -> str:
    """What must match for two runs to be the same experiment: the config but where it went and how often it
    repeated, the routing log simulated, and the machine."""
    config = {k: v for k, v in run.meta["config"].items()
              if k not in ("out", "overwrite", "baseline", "repeats", "warmup", "record_trace")}
    environment = run.meta.get("environment", {})
    machine = (environment.get("cpu"), environment.get("gpu", {}).get("name"))
    return json.dumps([config, run.meta.get("simulated", {}).get("trace_sha256"), machine], sort_keys=True,
                      default=str)


def commit_label(run: Run) -> str:
    environment = run.meta.get("environment", {})
    commit = environment.get("git_commit") or "unknown commit"
    return commit[:10] + (" (dirty)" if environment.get("git_dirty") else "")


COMPARED = {"ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "prefill_tok_s": "prefill tok/s",
            "decode_tok_s": "decode tok/s", "hit_rate": "hit rate", "copied_mb_per_repeat": "copied MB"}


def commits(runs: list[Run]) -> pd.DataFrame:
    """Runs of one setup made at different commits, side by side: per setup, strategy and COMPARED metric the
    value at each commit (runs in the order given) and its change against the first commit in per cent."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(setup_key(run), []).append(run)
    frames = []
    for number, group in enumerate(groups.values(), start=1):
        if len({commit_label(run) for run in group}) < 2:
            continue
        wide = pd.concat({f"{commit_label(run)} ({run.name})": run.tables["summary"].set_index("strategy")[
            [c for c in COMPARED if c in run.tables["summary"]]].stack() for run in group}, axis=1)
        first = wide.columns[0]
        for column in wide.columns[1:]:
            wide[f"Δ {column}"] = (wide[column] / wide[first] - 1) * 100
        frames.append(wide.rename_axis(["strategy", "metric"]).reset_index().assign(setup=number))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


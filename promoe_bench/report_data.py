"""The numbers behind the HTML report: pandas frames from run folders, one function per figure or table.

A report holds one run or several. Each (run, strategy) pair is a *series*, labelled by the strategy alone
when there is one run and by "run · strategy" otherwise. Every frame here has `series`, `run` and `strategy`
columns and covers the measured repeats only (warm-up excluded), as every figure of `run` does.
"""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UsageError
from .pcie import lane_bytes_per_s
from .results import load_run, load_timeline

# verdict column -> which way is better; the first four come with a CI from statistics.csv
VERDICT = {"ttft_ms": "lower", "tpot_ms": "lower", "prefill_tok_s": "higher", "decode_tok_s": "higher",
           "hit_rate": "higher", "stall_share": "lower", "copied_mb_per_repeat": "lower",
           "nvml_peak_memory_bytes": "lower", "peak_rss_bytes": "lower", "speedup_ttft": "higher",
           "speedup_tpot": "higher"}
WITH_CI = ("ttft_ms", "tpot_ms", "prefill_tok_s", "decode_tok_s")
HARDWARE = ("nvml_peak_memory_bytes", "peak_rss_bytes")  # measured by counters a machine may lack
# layers.csv column -> its part of a layer's time (router apart: it is neither attention nor an expert)
COMPONENTS = {"non_expert_s": "non-expert compute", "router_s": "router", "expert_s": "expert compute",
              "stall_s": "stall", "predict_s": "predictor"}


@dataclass(frozen=True)
class Run:
    name: str
    folder: Path
    meta: dict
    tables: dict[str, pd.DataFrame]
    timeline: pd.DataFrame | None  # None where the run kept none (simulate --no-timeline)
    prefix: str  # put before a strategy to name its series: "" for a lone run

    @property
    def simulated(self) -> bool:
        return "simulated" in self.meta

    @property
    def labels(self) -> list[str]:
        return list(self.tables["summary"]["strategy"])


def load_runs(folders: list[Path]) -> list[Run]:
    """Every folder as a Run, refusing with one clear line what is not a finished run's folder."""
    loaded = []
    for folder in folders:
        meta, tables = load_run(folder)  # refuses a non-run and another schema version
        if not meta.get("strategies") or "summary" not in tables or tables["summary"].empty:
            raise UsageError(f"{folder} holds no finished strategy (no summary.csv): nothing to report")
        loaded.append((Path(folder), meta, tables))
    names = [folder.name for folder, _, _ in loaded]
    if len(set(names)) < len(names):  # two runs called "latest": name them by the path given
        names = [str(folder) for folder, _, _ in loaded]
    several = len(loaded) > 1
    return [Run(name, folder, meta, tables, _timeline(folder), f"{name} · " if several else "")
            for name, (folder, meta, tables) in zip(names, loaded, strict=True)]


def _timeline(folder: Path) -> pd.DataFrame | None:
    try:
        return load_timeline(folder)
    except UsageError:
        return None


def label_parts(label: str) -> tuple[str, dict[str, str]]:
    """'promoe[cache_rate=0.25,predictor=noisy]' -> ('promoe', {'cache_rate': '0.25', 'predictor': 'noisy'})."""
    name, _, params = label.partition("[")
    pairs = (item.partition("=") for item in params.rstrip("]").split(",") if item)
    return name, {key: value for key, _, value in pairs}


def strip_param(label: str, param: str) -> str:
    name, params = label_parts(label)
    kept = ",".join(f"{k}={v}" for k, v in params.items() if k != param)
    return f"{name}[{kept}]" if kept else name


def series(runs: list[Run]) -> pd.DataFrame:
    """Every series in report order (run by run, strategies in run order) with its strategy's bare name."""
    return pd.DataFrame([{"series": run.prefix + label, "run": run.name, "strategy": label,
                          "name": label_parts(label)[0]} for run in runs for label in run.labels])


def rows(runs: list[Run], table: str) -> pd.DataFrame:
    """One table of every run, measured repeats only, with series and run columns."""
    frames = []
    for run in runs:
        frame = run.tables.get(table)
        if frame is None or frame.empty:
            continue
        if "warmup" in frame:
            frame = frame[~frame["warmup"].astype(bool)]
        frames.append(frame.assign(run=run.name, series=run.prefix + frame["strategy"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["series", "run", "strategy"])


def missing_reason(run: Run, label: str, column: str, baseline: str | None = None) -> str:
    """Why `column` of a strategy has no value: what run.json says this machine could not measure, else why
    the figure does not apply."""
    unmeasured = run.meta["strategies"].get(label, {}).get("unmeasured", {})
    if column in HARDWARE and (column in unmeasured or "hardware counters" in unmeasured):
        return unmeasured.get(column) or unmeasured["hardware counters"]
    if column.startswith("speedup"):
        return f"no baseline {baseline} at this strategy's cache rate in {run.name}"
    return f"not in {run.name}'s summary.csv"


def baseline_label(run: Run, label: str, baseline: str) -> str | None:
    """The strategy `label` is compared with: `baseline` at `label`'s own cache rate when the run has it at
    several (as `simulate --cache-rate 0.25,0.5` names them), else `baseline` itself."""
    rate = label_parts(label)[1].get("cache_rate")
    same_rate = [c for c in run.labels if rate is not None and strip_param(c, "cache_rate") == baseline
                 and label_parts(c)[1].get("cache_rate") == rate]
    return (same_rate or [c for c in run.labels if c == baseline] or [None])[0]


def verdict(runs: list[Run], baseline: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per series the VERDICT columns (and <metric>_ci_low / _ci_high for WITH_CI, from statistics.csv), and
    a frame of the same shape holding the reason where a value is missing. `baseline` None: each run's own."""
    values, reasons = [], []
    for run in runs:
        summary = run.tables["summary"].set_index("strategy")
        stats = run.tables.get("statistics", pd.DataFrame(columns=["strategy", "metric"])).set_index(
            ["strategy", "metric"])
        against = baseline or run.meta["config"].get("baseline")
        for label in run.labels:
            row = {"series": run.prefix + label, "run": run.name, "strategy": label}
            for metric in WITH_CI:
                found = stats.loc[(label, metric)] if (label, metric) in stats.index else None
                for field in ("median", "ci_low", "ci_high"):
                    row[metric if field == "median" else f"{metric}_{field}"] = (
                        float(found[field]) if found is not None else float("nan"))
            for column in ("hit_rate", "stall_share", "copied_mb_per_repeat", *HARDWARE):
                row[column] = summary.at[label, column] if column in summary else float("nan")
            base = baseline_label(run, label, against)
            for metric in ("ttft", "tpot"):
                row[f"speedup_{metric}"] = (summary.at[base, f"{metric}_ms"] / summary.at[label, f"{metric}_ms"]
                                            if base else float("nan"))
            values.append(row)
            reasons.append({column: missing_reason(run, label, column, against) if pd.isna(row[column]) else None
                            for column in VERDICT})
    return pd.DataFrame(values), pd.DataFrame(reasons)


def latency(runs: list[Run]) -> pd.DataFrame:
    """TTFT and TPOT per series: metric, median, ci_low, ci_high (statistics.csv)."""
    stats = rows(runs, "statistics")
    return stats[stats["metric"].isin(["ttft_ms", "tpot_ms"])][
        ["series", "run", "strategy", "metric", "median", "ci_low", "ci_high"]].reset_index(drop=True)


def inter_token(runs: list[Run]) -> pd.DataFrame:
    """Every measured decode step's milliseconds (steps.csv), per series."""
    steps = rows(runs, "steps")
    decode = steps[steps["phase"] == "decode"]
    return decode.assign(ms=decode["seconds"] * 1e3)[["series", "run", "strategy", "ms"]]


def time_breakdown(runs: list[Run]) -> pd.DataFrame:
    """Per series, phase and layer: the mean ms per step of each COMPONENTS part (layers.csv), long format."""
    layers = rows(runs, "layers")
    means = layers.groupby(["series", "phase", "layer"], sort=False)[list(COMPONENTS)].mean() * 1e3
    return means.rename(columns=COMPONENTS).reset_index().melt(
        id_vars=["series", "phase", "layer"], var_name="component", value_name="ms")


def hit_rate_per_layer(runs: list[Run]) -> pd.DataFrame:
    """Per series and layer: hits / routed experts over all measured steps."""
    layers = rows(runs, "layers")
    sums = layers.groupby(["series", "strategy", "layer"], sort=False)[["hits", "misses"]].sum().reset_index()
    return sums.assign(hit_rate=sums["hits"] / (sums["hits"] + sums["misses"]))


def prediction_distance(run: Run) -> dict[str, int]:
    """How many layers ahead each predicting strategy guesses: the farthest target - source of its timeline's
    predictions (promoe's layer 0 also guesses the nearer layers), else its `distance=` parameter."""
    found = {label: int(label_parts(label)[1]["distance"]) for label in run.labels
             if "distance" in label_parts(label)[1]}
    if run.timeline is not None:
        predictions = run.timeline[run.timeline["kind"] == "predict"]
        ahead = (predictions["target"] - predictions["layer"]).groupby(predictions["strategy"], sort=False)
        found.update({label: int(d.max()) for label, d in ahead})
    return found


def recall_per_layer(runs: list[Run]) -> pd.DataFrame:
    """Per predicting series and guessed layer, over decode steps: routed experts guessed / routed, and the
    distance it guesses at (NaN when unknown)."""
    layers = rows(runs, "layers")
    guessed = layers[(layers["phase"] == "decode") & layers["predicted_correct"].notna()]
    sums = guessed.groupby(["series", "run", "strategy", "layer"], sort=False)[
        ["predicted_correct", "hits", "misses"]].sum().reset_index()
    distances = {(run.name, label): d for run in runs for label, d in prediction_distance(run).items()}
    return sums.assign(recall=sums["predicted_correct"] / (sums["hits"] + sums["misses"]),
                       distance=[distances.get(key) for key in zip(sums["run"], sums["strategy"], strict=True)])


def prediction_quality(runs: list[Run]) -> pd.DataFrame:
    """recall, FetchRate, GoodPred and wasted MB per repeat (summary.csv) of the series that predict."""
    summary = rows(runs, "summary")
    return summary[summary["recall"].notna()][
        ["series", "strategy", "recall", "fetch_rate", "good_pred", "wasted_mb_per_repeat"]].reset_index(drop=True)


def bytes_per_step(runs: list[Run]) -> pd.DataFrame:
    """Per series and step: MB copied in that step (layers.csv bytes summed), mean over repeats and batches."""
    layers = rows(runs, "layers")
    per_step = layers.groupby(["series", "strategy", "repeat", "batch", "step"], sort=False)["bytes"].sum()
    mean = per_step.groupby(["series", "strategy", "step"], sort=False).mean() / 1e6
    return mean.rename("mb").reset_index()


def link_peak_gbps(run: Run, label: str) -> float | None:
    """The host-to-device peak a strategy's copies had: the emulated link's setting, the simulated hardware
    profile's, or the theoretical PCIe rate of the GPU's widest, newest link; None when unknown."""
    link = run.meta["strategies"][label].get("link", {})
    if link.get("gbps"):
        return link["gbps"]
    if link.get("kind") == "simulated" and link.get("costs", {}).get("kind") == "profile":
        from .profiles import load_hardware
        try:
            return load_hardware(link["costs"]["hardware"]).h2d_gbps
        except UsageError:  # a profile file that has since moved
            return None
    gpu = run.meta.get("environment", {}).get("gpu", {})
    lane = lane_bytes_per_s(gpu.get("pcie_generation_max"))
    return lane * gpu["pcie_width_max"] / 1e9 if lane and gpu.get("pcie_width_max") else None


def link_rates(runs: list[Run]) -> pd.DataFrame:
    """Per series and phase: GB/s copied (layers' bytes over the steps' seconds), NVML's PCIe GB/s where
    measured (summary.csv), and the link's peak."""
    layers, steps, summary = rows(runs, "layers"), rows(runs, "steps"), rows(runs, "summary").set_index("series")
    copied = layers.groupby(["series", "phase"], sort=False)["bytes"].sum()
    seconds = steps.groupby(["series", "phase"], sort=False)["seconds"].sum()
    rates = (copied / seconds / 1e9).rename("copied_gbps").reset_index()
    rates["pcie_gbps"] = [summary.at[s, f"{p}_pcie_gbps"] if f"{p}_pcie_gbps" in summary else float("nan")
                          for s, p in zip(rates["series"], rates["phase"], strict=True)]
    peaks = {run.prefix + label: link_peak_gbps(run, label) for run in runs for label in run.labels}
    return rates.assign(peak_gbps=rates["series"].map(peaks).astype(float))


# samples.csv column -> (shown as, scale); cumulative byte counters become rates between samples
SAMPLED = {"pcie_h2d_bytes": ("PCIe host-to-device GB/s (NVML)", 1e-9), "pcie_h2d_bytes_per_s":
           ("PCIe host-to-device GB/s (NVML)", 1e-9), "memory_used_bytes": ("GPU memory used GB (NVML)", 1e-9),
           "power_w": ("power W (NVML)", 1.0), "link_bytes": ("link GB/s (its own count)", 1e-9),
           "rss_bytes": ("process RSS GB", 1e-9)}
CUMULATIVE = ("pcie_h2d_bytes", "link_bytes")
RATE_WINDOW = 5  # samples (about 50 ms): between two 10 ms samples a whole chunk lands or none does
MAX_SAMPLES = 1500  # per series and counter: every k-th sample beyond, so a long run's file stays small


def samples_over_time(runs: list[Run]) -> pd.DataFrame:
    """Per series, counter and sample: t_s (the strategy's clock) and the value in SAMPLED's unit. Samples carry
    no repeat, so these cover a strategy's whole run, warm-up included."""
    samples = rows(runs, "samples")
    frames = []
    for column, (counter, scale) in SAMPLED.items():
        if column not in samples:
            continue
        for name, own in samples[["series", "t_s", column]].dropna().groupby("series", sort=False):
            own = own.sort_values("t_s")
            value = (own[column].diff(RATE_WINDOW) / own["t_s"].diff(RATE_WINDOW) if column in CUMULATIVE
                     else own[column])
            part = pd.DataFrame({"series": name, "counter": counter, "t_s": own["t_s"], "value": value * scale})
            every = -(-len(part) // MAX_SAMPLES)  # the ceiling of len / MAX_SAMPLES
            frames.append(part.dropna().iloc[::every])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["series", "counter", "t_s", "value"])


def step_timeline(runs: list[Run]) -> pd.DataFrame:
    """One prefill and one decode step of each series, from the first measured repeat's first batch: the
    prefill, and the middle decode step (the same step for every strategy of a run). Times in ms from the
    step's start; compute kinds, predictions and copy chunks (with priority and preemption)."""
    frames = []
    for run in runs:
        if run.timeline is None:
            continue
        events = run.timeline[~run.timeline["warmup"].astype(bool)]
        first = events[(events["repeat"] == events["repeat"].min())]
        first = first[first["batch"] == first["batch"].min()]
        decode = sorted(first.loc[first["phase"] == "decode", "step"].dropna().unique())
        chosen = [0] + ([int(decode[len(decode) // 2])] if decode else [])
        picked = first[first["step"].isin(chosen)]
        starts = picked[picked["kind"] == "step"].set_index(["strategy", "step"])["start_s"]
        shown = picked[~picked["kind"].isin(["step", "moe", "occupancy"])].copy()
        origin = starts.reindex(pd.MultiIndex.from_frame(shown[["strategy", "step"]])).to_numpy()
        shown["start_ms"] = (shown["start_s"] - origin) * 1e3
        shown["ms"] = (shown["end_s"] - shown["start_s"]) * 1e3
        shown["shown_step"] = [f"{phase} (step {step})" for phase, step in zip(shown["phase"], shown["step"],
                                                                              strict=True)]
        frames.append(shown.assign(run=run.name, series=run.prefix + shown["strategy"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

"""`promoe-bench compare BASE NEW`: did a change make a strategy slower? A regression gate that does not cry wolf.

Two kinds of metric, strategy by strategy:
- counters (bytes copied, hits, misses, evictions per measured repeat; in a simulated run, its times too):
  the same inputs give the same values, so a change past a tight tolerance is real. In a real run,
  strategies that prefetch race their copies against compute, so their counters move a little from
  run to run: they get a tolerance (PREFETCH_TOLERANCE), wider for hits and misses than for bytes.
- wall-clock times of a real run (TTFT, TPOT, prefill and decode tokens/s): a regression needs all of a
  relative change past the threshold, a one-sided Mann-Whitney U test over the samples (batches for TTFT
  and prefill, decode steps for TPOT and decode) significant at `alpha`, and an absolute change past the
  metric's noise floor. Direction-aware: only a change for the worse can regress.

BASE is a run folder or a baseline file (`promoe-bench baseline RUN --out FILE`, committed under
results/); NEW a run folder or a baseline file. Runs of different setups (model, workload, cache, device,
link, simulated profiles) are refused.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import mannwhitneyu

from .errors import UsageError
from .results import load_run
from .statistics import batch_samples

BASELINE_FORMAT = 1
# Relative tolerance of a real run's prefetching strategies' counters, which move with timing. Whether a
# prefetched expert has landed when its router chooses it is a race, so hits and misses (an expert still on
# the link is a miss) move most, evictions less, the bytes copied least (README: Regression gate).
PREFETCH_TOLERANCE = {"hits": 0.20, "misses": 0.20, "evictions": 0.10}
PREFETCH_BYTES_TOLERANCE = 0.05  # the bytes copied


@dataclass(frozen=True)
class Metric:
    better: str  # "lower" or "higher"
    kind: str  # "counter" or "time"
    threshold: float  # default relative change that may regress (counters: tolerance)
    floor: float = 0.0  # absolute change below which a time never regresses (noise), in the metric's unit


METRICS = {
    "ttft_ms": Metric("lower", "time", 0.20, floor=0.5),
    "tpot_ms": Metric("lower", "time", 0.20, floor=0.2),
    "prefill_tok_s": Metric("higher", "time", 0.20, floor=1.0),
    "decode_tok_s": Metric("higher", "time", 0.20, floor=1.0),
    "copied_bytes": Metric("lower", "counter", 0.0),
    "hits": Metric("higher", "counter", 0.0),
    "misses": Metric("lower", "counter", 0.0),
    "evictions": Metric("lower", "counter", 0.0),
}


# -- one side of a comparison: what a run folder (or a baseline file made from one) holds ------------------

def _setup(meta: dict) -> dict:
    """What must be equal for two runs to be compared."""
    config, model = meta["config"], meta.get("model", {})
    if "simulated" in meta:
        simulated = meta["simulated"]
        return {"kind": "simulated", "trace": simulated.get("trace_sha256"), "source": simulated.get("source"),
                "hardware": config.get("hardware"), "model profile": config.get("model_profile"),
                "precision": config.get("precision"), "measured": config.get("measured"),
                "cache rates": config.get("cache_rates"), "layer map": config.get("layer_map")}
    workload = {k: v for k, v in config["workload"].items() if k not in ("description", "path")}
    link = next(iter(meta["strategies"].values()), {}).get("link", {})
    return {"kind": "real", "model": config["model"], "family": model.get("family"),
            "shape": [model.get("moe_layers"), model.get("experts_per_layer"), model.get("top_k")],
            "dtype": model.get("dtype"), "workload": workload, "cache rate": config.get("cache_rate"),
            "gpu memory": config.get("gpu_memory"), "device": meta["environment"]["device"].split(":")[0],
            "link": {k: link.get(k) for k in ("kind", "gbps", "latency_us")}}


def baseline_document(folder: Path) -> dict:
    """A run folder reduced to what `compare` reads: setup, counters and samples per strategy."""
    meta, tables = load_run(folder)
    if meta.get("status") != "complete" or "summary" not in tables:
        raise UsageError(f"{folder}: the run is {meta.get('status', 'unknown')}; compare complete runs only")
    simulated = "simulated" in meta
    strategies = {}
    for label in meta["strategies"]:
        layers, requests, steps = (tables[name][(tables[name]["strategy"] == label) & ~tables[name]["warmup"]]
                                   for name in ("layers", "requests", "steps"))
        repeats = max(requests["repeat"].nunique(), 1)
        batches = batch_samples(requests)
        decode = steps[steps["phase"] == "decode"]
        samples = {"ttft_ms": (batches["ttft_s"] * 1e3).tolist(),
                   "prefill_tok_s": batches["prefill_tok_s"].tolist(),
                   "tpot_ms": (decode["seconds"] * 1e3).tolist(),
                   "decode_tok_s": (decode["tokens"] / decode["seconds"]).tolist()}
        counters = {"copied_bytes": layers["bytes"].sum() / repeats, "hits": layers["hits"].sum() / repeats,
                    "misses": layers["misses"].sum() / repeats, "evictions": layers["evictions"].sum() / repeats}
        if simulated:  # deterministic: its times are counters
            counters.update({name: float(pd.Series(values).median()) for name, values in samples.items()})
            samples = {}
        strategies[label] = {"counters": {k: float(v) for k, v in counters.items()}, "samples": samples,
                             "prefetching": bool(layers["predicted"].notna().any())}
    return {"format": BASELINE_FORMAT, "setup": _setup(meta), "from": str(folder),
            "git_commit": meta.get("environment", {}).get("git_commit"), "strategies": strategies}


def load_side(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        return baseline_document(path)
    if not path.is_file():
        raise UsageError(f"{path} is neither a run folder nor a baseline file")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not a baseline file (not JSON: {error})") from None
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT:
        raise UsageError(f"{path} is not a promoe-bench baseline file of format {BASELINE_FORMAT}")
    return document


def save_baseline(folder: Path, out: Path) -> dict:
    document = baseline_document(folder)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return document


# -- the comparison ---------------------------------------------------------------------------------

def parse_thresholds(specs: list[str]) -> dict[tuple[str | None, str], float]:
    """`NAME=T` or `STRATEGY:NAME=T`, T a fraction or a percentage (10% = 0.1) -> {(strategy, name): T}."""
    out = {}
    for spec in specs:
        key, sep, value = spec.rpartition("=")  # the last: a strategy's label may hold '=' (promoe[distance=1])
        strategy, _, name = key.rpartition(":") if ":" in key else (None, "", key)
        if not sep or name not in METRICS:
            raise UsageError(f"--metric {spec!r}: expected [STRATEGY:]NAME=THRESHOLD with NAME one of "
                             f"{', '.join(METRICS)}")
        try:
            threshold = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise UsageError(f"--metric {spec!r}: {value!r} is not a number or a percentage") from None
        if threshold < 0:
            raise UsageError(f"--metric {spec!r}: a threshold is not negative")
        out[(strategy or None, name)] = threshold
    return out


def _worse(metric: Metric, base: float, new: float) -> float:
    """The relative change for the worse (positive), or for the better (negative)."""
    if base == 0:
        return 0.0 if new == base else math.copysign(math.inf, (new - base) * (1 if metric.better == "lower" else -1))
    change = (new - base) / abs(base)
    return change if metric.better == "lower" else -change


def compare(base: dict, new: dict, thresholds: dict | None = None, alpha: float = 0.01,
            only: str | None = None) -> pd.DataFrame:
    """One row per (strategy, metric) both sides have: values, change, p-value, verdict (ok, improved,
    regressed). `only`: "counter" or "time" metrics alone."""
    differences = [f"{key} ({base['setup'].get(key)} vs {new['setup'].get(key)})"
                   for key in sorted(set(base["setup"]) | set(new["setup"]))
                   if base["setup"].get(key) != new["setup"].get(key)]
    if differences:
        raise UsageError(f"refused: the runs are of different setups: {'; '.join(differences)}")
    thresholds = thresholds or {}
    rows = []
    for label in [s for s in base["strategies"] if s in new["strategies"]]:
        ours, theirs = base["strategies"][label], new["strategies"][label]
        for name, metric in METRICS.items():
            kind = "counter" if name in ours["counters"] else metric.kind
            if only is not None and kind != only:
                continue
            if kind == "counter" and ours["prefetching"] and base["setup"]["kind"] == "real":
                default = PREFETCH_TOLERANCE.get(name, PREFETCH_BYTES_TOLERANCE)
            else:
                default = 1e-9 if kind == "counter" else metric.threshold
            threshold = thresholds.get((label, name), thresholds.get((None, name), default))
            rows.append(_row(label, name, metric, kind, ours, theirs, threshold, alpha))
    return pd.DataFrame(rows)


def _row(label, name, metric: Metric, kind, ours, theirs, threshold, alpha) -> dict:
    if kind == "counter":
        before, after = ours["counters"][name], theirs["counters"][name]
        worse, p = _worse(metric, before, after), None
        regressed = worse > threshold
    else:
        a, b = ours["samples"][name], theirs["samples"][name]
        before, after = float(pd.Series(a).median()), float(pd.Series(b).median())
        worse = _worse(metric, before, after)
        # one-sided: are the new samples worse (greater for lower-is-better metrics)?
        p = float(mannwhitneyu(b, a, alternative="greater" if metric.better == "lower" else "less").pvalue) \
            if len(a) and len(b) else math.nan
        regressed = worse > threshold and p < alpha and abs(after - before) > metric.floor
    verdict = "regressed" if regressed else "improved" if worse < -max(threshold, 1e-9) else "ok"
    return {"strategy": label, "metric": name, "kind": kind, "base": before, "new": after, "change": worse,
            "threshold": threshold, "p_value": p, "verdict": verdict}


# -- output -----------------------------------------------------------------------------------------

def _cell(value, fmt="{:.4g}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def render(table: pd.DataFrame, form: str, base: dict, new: dict) -> str:
    regressed = table[table["verdict"] == "regressed"] if not table.empty else table
    headline = (f"{len(regressed)} regression{'s' * (len(regressed) != 1)}" if len(regressed)
                else "no regression") + f" in {len(table)} checks ({base.get('from')} -> {new.get('from')})"
    if form == "json":
        return json.dumps({"regressions": len(regressed), "headline": headline,
                           "rows": json.loads(table.to_json(orient="records"))}, indent=1)
    shown = table.assign(
        base=table["base"].map(_cell), new=table["new"].map(_cell),
        change=table["change"].map(lambda v: _cell(v * 100, "{:+.1f}%") + " worse" if v > 0 else
                                   _cell(-v * 100, "{:.1f}%") + " better" if v < 0 else "="),
        threshold=table["threshold"].map(lambda v: _cell(v * 100, "{:.3g}%")),
        p_value=table["p_value"].map(_cell)) if not table.empty else table
    if form == "markdown":
        lines = [f"### promoe-bench compare: {'❌ ' if len(regressed) else '✅ '}{headline}", ""]
        if not shown.empty:
            lines += ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
            lines += ["| " + " | ".join(f"**{v}**" if row.verdict == "regressed" else str(v) for v in row) + " |"
                      for row in shown.itertuples(index=False)]
        return "\n".join(lines)
    return headline + ("\n" + shown.to_string(index=False) if not shown.empty else "")

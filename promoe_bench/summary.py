"""One row per strategy from the raw tables: the figures `run` prints and `summary.csv` holds.

Measured repeats only (warm-up excluded). TTFT and TPOT are medians over requests; tokens/s are
totals over the measured steps (prompt tokens over prefill time; generated tokens over decode time).
Prediction figures are over decode steps of the layers a predictor guessed (in prefill nearly every
expert is routed, so any guess looks right): recall = routed experts guessed / routed; fetch rate =
of those guessed right, the share ready when compute needed them; good_pred = recall x fetch rate.
ready_rate = routed experts ready when compute needed them, all steps; wasted = prefetched bytes
evicted or dropped before any use. Hardware figures (PCIe, link, energy, memory peaks) come from the
phases' counters (`hardware`).
"""

import pandas as pd


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, layers: pd.DataFrame, baseline: str | dict[str, str],
              tokens_match: dict[str, bool], phases: pd.DataFrame | None = None) -> pd.DataFrame:
    measured = requests[~requests["warmup"]]
    layer_rows = layers[~layers["warmup"]]
    step_rows = steps[~steps["warmup"]]
    repeats = measured["repeat"].nunique()
    rows = []
    for label, group in measured.groupby("strategy", sort=False):
        lay = layer_rows[layer_rows["strategy"] == label]
        own_steps = step_rows[step_rows["strategy"] == label]
        prefill = own_steps[own_steps["phase"] == "prefill"]
        decode = own_steps[own_steps["phase"] == "decode"]
        accesses = lay["hits"].sum() + lay["misses"].sum()
        guessed = lay[(lay["phase"] == "decode") & (lay["predicted"] != "")]  # layers a predictor guessed
        guessed_routed = guessed["hits"].sum() + guessed["misses"].sum()
        correct = guessed["predicted_correct"].sum()
        rows.append({
            "strategy": label,
            "ttft_ms": group["ttft_s"].median() * 1e3,
            "tpot_ms": group["tpot_s"].median() * 1e3,
            "prefill_tok_s": prefill["tokens"].sum() / prefill["seconds"].sum(),
            "decode_tok_s": decode["tokens"].sum() / decode["seconds"].sum() if len(decode) else float("nan"),
            "hit_rate": lay["hits"].sum() / accesses if accesses else float("nan"),
            "stall_share": lay["stall_s"].sum(skipna=False) / own_steps["seconds"].sum(),
            "copied_mb_per_repeat": lay["bytes"].sum() / repeats / 1e6,
            "evictions_per_repeat": lay["evictions"].sum() / repeats,
            "ready_rate": lay["ready"].sum() / accesses if accesses else float("nan"),
            "recall": correct / guessed_routed if guessed_routed else float("nan"),
            "fetch_rate": guessed["predicted_ready"].sum() / correct if correct else float("nan"),
            "good_pred": guessed["predicted_ready"].sum() / guessed_routed if guessed_routed else float("nan"),
            "wasted_mb_per_repeat": lay["wasted_bytes"].sum() / repeats / 1e6,
            "predict_ms_per_step": lay["predict_s"].sum() / len(own_steps) * 1e3,
            "tokens_match": tokens_match[label],
        })
    summary = pd.DataFrame(rows)
    if phases is not None and not phases.empty:
        summary = summary.merge(hardware(phases), on="strategy", how="left")
    # a baseline per strategy when strategies run at several cache rates: each against its own rate's
    base = summary.set_index("strategy")
    against = summary["strategy"].map(baseline if isinstance(baseline, dict) else lambda _: baseline)
    if against.isin(base.index).any():
        summary["speedup_ttft"] = against.map(base["ttft_ms"]) / summary["ttft_ms"]
        summary["speedup_tpot"] = against.map(base["tpot_ms"]) / summary["tpot_ms"]
    return summary


def hardware(phases: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, from the measured phases' counters: per phase the achieved PCIe and link GB/s
    (bytes over the phase's seconds) and energy per token; the peaks of GPU memory and RSS. A counter
    this machine lacks stays missing (NaN), never 0."""
    measured = phases[~phases["warmup"]]
    rows = []
    for label, own in measured.groupby("strategy", sort=False):
        row = {"strategy": label}
        for phase, part in own.groupby("phase"):
            seconds, tokens = part["seconds"].sum(), part["tokens"].sum()
            row[f"{phase}_pcie_gbps"] = part["pcie_h2d_bytes"].sum(min_count=len(part)) / seconds / 1e9
            row[f"{phase}_link_gbps"] = part["link_bytes"].sum(min_count=len(part)) / seconds / 1e9
            row[f"{phase}_energy_per_token_j"] = part["energy_j"].sum(min_count=len(part)) / tokens
        for peak in ("nvml_peak_memory_bytes", "torch_max_allocated_bytes", "torch_max_reserved_bytes",
                     "peak_rss_bytes"):
            row[peak] = own[peak].max()
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(summary: pd.DataFrame, baseline: str) -> str:
    """The comparison table `run` prints."""
    columns = {
        "strategy": ("strategy", "{}"),
        "ttft_ms": ("TTFT ms", "{:.1f}"),
        "tpot_ms": ("TPOT ms", "{:.2f}"),
        "prefill_tok_s": ("prefill tok/s", "{:.0f}"),
        "decode_tok_s": ("decode tok/s", "{:.1f}"),
        "hit_rate": ("hit rate", "{:.1%}"),
        "stall_share": ("stall", "{:.1%}"),
        "copied_mb_per_repeat": ("copied MB", "{:.1f}"),
        "recall": ("recall", "{:.2f}"),
        "good_pred": ("GoodPred", "{:.2f}"),
        "wasted_mb_per_repeat": ("wasted MB", "{:.1f}"),
        "speedup_ttft": (f"TTFT x vs {baseline}", "{:.2f}"),
        "speedup_tpot": (f"TPOT x vs {baseline}", "{:.2f}"),
        "tokens_match": ("same tokens", "{}"),
    }
    shown = pd.DataFrame({
        title: [fmt.format(v) if pd.notna(v) else "-" for v in summary[key]]
        for key, (title, fmt) in columns.items() if key in summary
    })
    return shown.to_string(index=False)

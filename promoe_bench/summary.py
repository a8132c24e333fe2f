"""One row per strategy from the raw tables: the figures `run` prints and `summary.csv` holds.

All figures use measured repeats only (warm-up excluded) and medians over repeats.
"""

import pandas as pd

from .config import RunConfig


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, layers: pd.DataFrame, cfg: RunConfig,
              tokens_match: dict[str, bool]) -> pd.DataFrame:
    measured = requests[~requests["warmup"]]
    layer_rows = layers[~layers["warmup"]]
    step_rows = steps[~steps["warmup"]]
    rows = []
    for label, group in measured.groupby("strategy", sort=False):
        lay = layer_rows[layer_rows["strategy"] == label]
        accesses = lay["hits"].sum() + lay["misses"].sum()
        total_s = step_rows.loc[step_rows["strategy"] == label, "seconds"].sum()
        ttft = group.groupby("repeat")["ttft_s"].first().median()
        tpot = group.groupby("repeat")["tpot_s"].first().median()
        rows.append({
            "strategy": label,
            "ttft_ms": ttft * 1e3,
            "tpot_ms": tpot * 1e3,
            # tokens/s of the whole batch: B prompts of P tokens in one prefill, B tokens per decode step
            "prefill_tok_s": cfg.batch_size * cfg.prompt_len / ttft,
            "decode_tok_s": cfg.batch_size / tpot,
            "hit_rate": lay["hits"].sum() / accesses if accesses else float("nan"),
            "stall_share": lay["stall_s"].sum() / total_s if total_s else float("nan"),
            "copied_mb_per_repeat": lay["bytes"].sum() / lay["repeat"].nunique() / 1e6,
            "evictions_per_repeat": lay["evictions"].sum() / lay["repeat"].nunique(),
            "tokens_match": tokens_match[label],
        })
    summary = pd.DataFrame(rows)
    base = summary[summary["strategy"] == cfg.baseline]
    if not base.empty:
        summary["speedup_ttft"] = base["ttft_ms"].iloc[0] / summary["ttft_ms"]
        summary["speedup_tpot"] = base["tpot_ms"].iloc[0] / summary["tpot_ms"]
    return summary


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
        "speedup_ttft": (f"TTFT x vs {baseline}", "{:.2f}"),
        "speedup_tpot": (f"TPOT x vs {baseline}", "{:.2f}"),
        "tokens_match": ("same tokens", "{}"),
    }
    shown = pd.DataFrame({
        title: [fmt.format(v) if pd.notna(v) else "-" for v in summary[key]]
        for key, (title, fmt) in columns.items() if key in summary
    })
    return shown.to_string(index=False)

"""Statistics over the measured repeats of a run: how spread out each figure is, and how sure its median is.

Quantiles (median, p90, p99 and the quartiles of the IQR) use pandas' default linear interpolation: the q-th
quantile of n sorted values sits at position q * (n - 1), between the two values around it. The confidence
interval of the median is a percentile bootstrap: resample the values with replacement, take each resample's
median, and keep the middle `confidence` share of those medians. Warm-up repeats are recorded in the raw
tables but never enter these statistics.
"""

import numpy as np
import pandas as pd

FIELDS = ("n", "median", "mean", "min", "max", "p90", "p99", "iqr", "ci_low", "ci_high", "iqr_over_median")
COLUMNS = ("strategy", "metric", *FIELDS)

# metric -> (column of the requests table, scale): times are stored in seconds and shown in ms
METRICS = {
    "ttft_ms": ("ttft_s", 1e3),
    "tpot_ms": ("tpot_s", 1e3),
    "prefill_tok_s": ("prefill_tok_s", 1.0),
    "decode_tok_s": ("decode_tok_s", 1.0),
}

_BOOTSTRAP_CHUNK = 1 << 22  # resampled values held at once (32 MiB of float64), whatever the sample size


def describe(values, *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """The FIELDS of one metric's samples. NaNs are dropped and `n` counts the rest; no samples gives n=0 and
    NaN everywhere else; one sample gives the degenerate interval (v, v). The same seed gives the same interval.
    iqr_over_median is the IQR relative to |median| (NaN when the median is 0)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    samples = pd.Series(values, dtype=float).dropna()
    if samples.empty:
        return {field: 0 if field == "n" else float("nan") for field in FIELDS}
    p25, median, p75, p90, p99 = samples.quantile([0.25, 0.5, 0.75, 0.9, 0.99])
    ci_low, ci_high = _bootstrap_median_ci(samples.to_numpy(), confidence, resamples, seed)
    iqr = p75 - p25
    return {
        "n": len(samples), "median": median, "mean": samples.mean(), "min": samples.min(), "max": samples.max(),
        "p90": p90, "p99": p99, "iqr": iqr, "ci_low": ci_low, "ci_high": ci_high,
        "iqr_over_median": iqr / abs(median) if median else float("nan"),
    }


def _bootstrap_median_ci(values: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(values)
    rows = max(1, _BOOTSTRAP_CHUNK // n)  # resamples per chunk, so memory stays bounded for large samples
    medians = np.concatenate([
        np.median(values[rng.integers(0, n, size=(min(rows, resamples - start), n))], axis=1)  # [R, n] -> [R]
        for start in range(0, resamples, rows)
    ])
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(low), float(high)


def statistics_table(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, metric) over every measured batch, strategies in order of first appearance;
    the COLUMNS are strategy, metric, then the FIELDS of `describe`.

    A batch is one sample: its requests share one prefill and one decode, so counting each request would
    claim a certainty the run does not have. Its tokens/s are the batch's: prompt tokens over its TTFT,
    requests over its TPOT."""
    batches = batch_samples(requests[~requests["warmup"]])
    rows = [
        {"strategy": strategy, "metric": metric, **describe(group[column] * scale)}
        for strategy, group in batches.groupby("strategy", sort=False)
        for metric, (column, scale) in METRICS.items()
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def batch_samples(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, repeat, batch): its TTFT and TPOT (its requests share them), prompt tokens,
    requests, and the batch's prefill and decode tokens/s."""
    batches = requests.groupby(["strategy", "repeat", "batch"], sort=False).agg(
        ttft_s=("ttft_s", "first"), tpot_s=("tpot_s", "first"), prompt_tokens=("prompt_tokens", "sum"),
        size=("request", "size")).reset_index()
    batches["prefill_tok_s"] = batches["prompt_tokens"] / batches["ttft_s"]
    batches["decode_tok_s"] = batches["size"] / batches["tpot_s"]
    return batches


def variability_warnings(table: pd.DataFrame, requests: pd.DataFrame,
                         threshold: float = 0.10) -> tuple[list[str], str | None]:
    """Warnings on the rows of a statistics table whose IQR exceeds `threshold` of its median (NaN never warns),
    with their likely cause, from the run's `requests`. Batches of different prompts differ by themselves, so
    the machine is blamed only when one batch measured in several repeats varied (the median over batches of
    its range over its median); rows whose batches repeated steadily are no warning, but one note."""
    batches = batch_samples(requests[~requests["warmup"]])
    lines, steady = [], []  # steady: (IQR over median, largest repeat spread) of rows spread by the workload
    for row in table.itertuples(index=False):
        if not row.iqr_over_median > threshold:
            continue
        line = f"{row.strategy} {row.metric}: IQR is {row.iqr_over_median:.0%} of the median over {row.n} samples; "
        per_batch = batches[batches["strategy"] == row.strategy].groupby("batch")[METRICS[row.metric][0]]
        if per_batch.ngroups == 1:  # every sample is the same batch again
            lines.append(line + "the machine may be noisy (more --repeats, or a quieter machine)")
        elif per_batch.size().min() < 2:
            lines.append(line + f"its {per_batch.ngroups} batches differ, and with one repeat of each the "
                                "machine's noise cannot be told apart (--repeats 2 or more)")
        else:
            spread = float(((per_batch.max() - per_batch.min()) / per_batch.median()).median())
            if spread > threshold:
                lines.append(line + f"one batch varied by {spread:.0%} between repeats: the machine may be noisy "
                                    "(more --repeats, or a quieter machine)")
            else:
                steady.append((row.iqr_over_median, spread))
    note = (f"{len(steady)} figures spread by up to {max(i for i, _ in steady):.0%} (IQR over median) because the "
            f"workload's batches differ; each batch repeated within {max(s for _, s in steady):.0%}: the "
            "workload's own spread, not noise") if steady else None
    return lines, note

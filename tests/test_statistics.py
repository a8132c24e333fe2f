"""Statistics over repeats: exact values on hand-made samples, the bootstrap's contract, and the table's shape."""

import math

import numpy as np
import pandas as pd
import pytest

from promoe_bench.statistics import COLUMNS, FIELDS, describe, statistics_table, variability_warnings


def test_describe_on_a_hand_made_sample():
    stats = describe([4, 100, 1, 3, 2])  # unsorted on purpose
    assert stats["n"] == 5
    assert stats["median"] == 3 and stats["mean"] == 22
    assert stats["min"] == 1 and stats["max"] == 100
    # linear interpolation, position q * (n - 1) in [1, 2, 3, 4, 100]:
    # p25 at 1.0 -> 2; p75 at 3.0 -> 4; p90 at 3.6 -> 4 + 0.6 * 96 = 61.6; p99 at 3.96 -> 4 + 0.96 * 96 = 96.16
    assert stats["iqr"] == pytest.approx(2)
    assert stats["p90"] == pytest.approx(61.6)
    assert stats["p99"] == pytest.approx(96.16)
    assert stats["iqr_over_median"] == pytest.approx(2 / 3)
    assert set(stats) == set(FIELDS)


def test_describe_interpolates_quartiles_between_values():
    # [10, 20, 30, 40]: p25 at 0.75 -> 17.5; p75 at 2.25 -> 32.5; median at 1.5 -> 25
    stats = describe([10, 20, 30, 40])
    assert stats["median"] == pytest.approx(25)
    assert stats["iqr"] == pytest.approx(15)


def test_confidence_interval_contains_the_median():
    values = np.random.default_rng(1).lognormal(mean=2.0, sigma=0.3, size=200)
    stats = describe(values)
    assert stats["ci_low"] < stats["median"] < stats["ci_high"]


def test_confidence_interval_narrows_with_more_samples_of_the_same_distribution():
    rng = np.random.default_rng(2)
    few, many = describe(rng.normal(10, 1, size=30)), describe(rng.normal(10, 1, size=3000))
    assert many["ci_high"] - many["ci_low"] < (few["ci_high"] - few["ci_low"]) / 3  # width ~ 1/sqrt(n): 10x here


def test_wider_confidence_gives_a_wider_interval():
    values = np.random.default_rng(3).normal(10, 1, size=100)
    narrow, wide = describe(values, confidence=0.5), describe(values, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] and narrow["ci_high"] < wide["ci_high"]


def test_confidence_interval_of_a_constant_sample_is_degenerate():
    stats = describe([7.5] * 40)
    assert (stats["ci_low"], stats["ci_high"]) == (7.5, 7.5)
    assert stats["iqr"] == 0 and stats["iqr_over_median"] == 0


def test_one_sample_gives_the_interval_v_v():
    stats = describe([4.2])
    assert stats["n"] == 1 and stats["median"] == 4.2
    assert (stats["ci_low"], stats["ci_high"]) == (4.2, 4.2)


def test_same_seed_same_interval_other_seed_other_interval():
    # an even size, so resampled medians are midpoints of two values and the seeds' intervals tell apart
    values = np.random.default_rng(4).exponential(size=100)
    first, again, other = (describe(values, resamples=500, seed=seed) for seed in (5, 5, 6))
    assert (first["ci_low"], first["ci_high"]) == (again["ci_low"], again["ci_high"])
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])


def test_nans_are_dropped_and_not_counted():
    assert describe([1, float("nan"), 2, 3, 4, 100, None]) == describe([1, 2, 3, 4, 100])
    assert describe([1, float("nan"), 2, 3, 4, 100])["n"] == 5


@pytest.mark.parametrize("values", [[], [float("nan"), float("nan")]])
def test_no_samples_gives_n_zero_and_nan_elsewhere(values):
    stats = describe(values)
    assert stats["n"] == 0
    assert all(math.isnan(stats[field]) for field in FIELDS if field != "n")


def test_zero_median_gives_no_ratio():
    assert math.isnan(describe([-1, 0, 0, 1])["iqr_over_median"])


@pytest.mark.parametrize("confidence", [0, 1, 95])
def test_confidence_outside_zero_one_is_refused(confidence):
    with pytest.raises(ValueError, match="confidence"):
        describe([1, 2, 3], confidence=confidence)


def test_bootstrap_of_more_values_than_one_chunk_holds():
    # 2000 resamples x 5000 values = 10M resampled values, three chunks of the bootstrap's 4M
    values = np.random.default_rng(8).normal(100, 5, size=5000)
    stats = describe(values, resamples=2_000)
    assert stats["ci_low"] < stats["median"] < stats["ci_high"]
    assert stats["ci_high"] - stats["ci_low"] < 1  # median's standard error ~ 1.25 * 5 / sqrt(5000) = 0.09


def requests_table(rows):
    """Requests rows as run_strategy builds them, from (strategy, warmup, ttft_s, tpot_s) tuples, a batch each."""
    return pd.DataFrame([
        {"strategy": strategy, "repeat": 0, "warmup": warmup, "batch": number, "request": number, "prompt_tokens": 10,
         "output_tokens": 5, "ttft_s": ttft, "tpot_s": tpot, "prefill_tok_s": 10 / ttft, "decode_tok_s": 1 / tpot}
        for number, (strategy, warmup, ttft, tpot) in enumerate(rows)
    ])


def test_a_batch_is_one_sample_and_its_rates_are_the_batchs():
    requests = requests_table([("lru", False, 0.1, 0.01), ("lru", False, 0.1, 0.01), ("lru", False, 0.3, 0.02)])
    requests["batch"] = [0, 0, 1]  # two requests decoded together, then one alone
    requests["prompt_tokens"] = [10, 30, 20]
    table = statistics_table(requests).set_index("metric")
    assert (table["n"] == 2).all()
    assert table.loc["ttft_ms", "min"] == pytest.approx(100) and table.loc["ttft_ms", "max"] == pytest.approx(300)
    assert table.loc["prefill_tok_s", "max"] == pytest.approx(400)  # (10 + 30) tokens / 0.1 s
    assert table.loc["decode_tok_s", "median"] == pytest.approx((200 + 50) / 2)  # 2 / 0.01 s and 1 / 0.02 s


def test_table_has_one_row_per_strategy_and_metric_in_first_appearance_order():
    requests = requests_table([("lru", False, 0.1, 0.01), ("full_gpu", False, 0.05, 0.005),
                               ("lru", False, 0.2, 0.02), ("promoe", False, 0.3, 0.03)])
    table = statistics_table(requests)
    assert list(table.columns) == list(COLUMNS)
    assert list(table["strategy"]) == ["lru"] * 4 + ["full_gpu"] * 4 + ["promoe"] * 4
    assert list(table["metric"]) == ["ttft_ms", "tpot_ms", "prefill_tok_s", "decode_tok_s"] * 3
    lru = table[table["strategy"] == "lru"].set_index("metric")
    assert lru.loc["ttft_ms", "median"] == pytest.approx(150)  # ms, of 100 and 200
    assert lru.loc["tpot_ms", "mean"] == pytest.approx(15)
    assert lru.loc["prefill_tok_s", "min"] == pytest.approx(50)  # 10 tokens / 0.2 s
    assert lru.loc["decode_tok_s", "max"] == pytest.approx(100)
    assert list(lru["n"]) == [2] * 4


def test_warmup_rows_change_nothing():
    measured = [("lru", False, 0.1, 0.01), ("lru", False, 0.12, 0.011), ("lru", False, 0.11, 0.012)]
    with_warmup = statistics_table(requests_table([("lru", True, 1000.0, 50.0), *measured]))
    pd.testing.assert_frame_equal(with_warmup, statistics_table(requests_table(measured)))
    assert with_warmup["max"].iloc[0] == pytest.approx(120)  # ms: the warm-up's 1e6 ms is nowhere


def test_a_strategy_with_only_warmup_rows_has_no_row():
    table = statistics_table(requests_table([("cold", True, 1.0, 0.1), ("lru", False, 0.1, 0.01)]))
    assert set(table["strategy"]) == {"lru"}


def test_table_of_no_measured_rows_is_empty_with_the_columns():
    table = statistics_table(requests_table([("lru", True, 1.0, 0.1)]))
    assert table.empty and list(table.columns) == list(COLUMNS)


def statistics_rows(*rows):
    """A statistics table reduced to what the warnings read: (strategy, metric, n, iqr_over_median)."""
    return pd.DataFrame([dict(zip(("strategy", "metric", "n", "iqr_over_median"), row, strict=True))
                         for row in rows])


def one_batch_repeated(*strategies):
    """Requests of one batch measured twice per strategy: every sample is the same batch again."""
    requests = requests_table([(strategy, False, 0.1, 0.01) for strategy in strategies for _ in range(2)])
    requests["batch"], requests["repeat"] = 0, [i % 2 for i in range(len(requests))]
    return requests


def test_warnings_fire_above_ten_percent_only():
    table = statistics_rows(("lru", "tpot_ms", 12, 0.14), ("lru", "ttft_ms", 12, 0.09),
                            ("promoe", "ttft_ms", 6, 0.25), ("full_gpu", "tpot_ms", 0, float("nan")))
    assert variability_warnings(table, one_batch_repeated("lru", "promoe", "full_gpu"))[0] == [
        "lru tpot_ms: IQR is 14% of the median over 12 samples; "
        "the machine may be noisy (more --repeats, or a quieter machine)",
        "promoe ttft_ms: IQR is 25% of the median over 6 samples; "
        "the machine may be noisy (more --repeats, or a quieter machine)",
    ]


def test_warning_threshold_is_strict_and_adjustable():
    table = statistics_rows(("lru", "tpot_ms", 12, 0.10), ("lru", "ttft_ms", 12, 0.04))
    requests = one_batch_repeated("lru")
    assert variability_warnings(table, requests) == ([], None)
    assert [line.split(":")[0] for line in variability_warnings(table, requests, threshold=0.03)[0]] == [
        "lru tpot_ms", "lru ttft_ms"]


def two_batches_twice(ttfts):
    """lru's batches 0 and 1, each measured in repeats 0 and 1: `ttfts` in that order (b0r0, b0r1, b1r0, b1r1)."""
    requests = requests_table([("lru", False, ttft, 0.01) for ttft in ttfts])
    requests["batch"], requests["repeat"] = [0, 0, 1, 1], [0, 1, 0, 1]
    return requests


def test_batches_that_differ_but_repeat_steadily_are_the_workloads_spread_not_noise():
    # 100, 102, 198, 200 ms: p25 101.5, p75 198.5, IQR 97 = 65% of the median 150; the batches' ranges over
    # their medians are 2/101 and 2/199, whose median is 1.5%
    requests = two_batches_twice([0.100, 0.102, 0.200, 0.198])
    assert variability_warnings(statistics_table(requests), requests) == ([], (
        "2 figures spread by up to 65% (IQR over median) because the workload's batches differ; each batch "
        "repeated within 1%: the workload's own spread, not noise"))  # ttft and prefill tok/s


def test_a_batch_that_varies_between_repeats_blames_the_machine():
    requests = two_batches_twice([0.100, 0.150, 0.200, 0.300])  # each batch 40% apart from itself
    lines, note = variability_warnings(statistics_table(requests), requests)
    assert note is None
    assert lines[0].endswith("one batch varied by 40% between repeats: the machine may be noisy "
                             "(more --repeats, or a quieter machine)")


def test_warnings_from_a_noisy_run():
    # tpot 10, 10, 10, 12 ms: p25 10, p75 10.5 -> IQR 5% of the median 10 (decode tok/s alike, 4%): quiet;
    # ttft 100, 100, 200, 200 ms: p25 100, p75 200 -> IQR 67% of the median 150 (prefill tok/s alike): noisy
    requests = requests_table([("lru", False, ttft, tpot) for ttft, tpot in
                               [(0.1, 0.010), (0.1, 0.010), (0.2, 0.010), (0.2, 0.012)]])
    lines, _ = variability_warnings(statistics_table(requests), requests)
    assert [line.split(":")[0] for line in lines] == ["lru ttft_ms", "lru prefill_tok_s"]
    assert lines[0] == ("lru ttft_ms: IQR is 67% of the median over 4 samples; its 4 batches differ, and with one "
                        "repeat of each the machine's noise cannot be told apart (--repeats 2 or more)")

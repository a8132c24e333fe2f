"""`promoe-bench compare`: planted regressions are caught, a run against itself or a rerun passes, and runs of
different setups are refused."""

import json

import pytest

from promoe_bench.compare import baseline_document, compare, parse_thresholds
from promoe_bench.errors import UsageError
from promoe_bench.offload import OffloadRuntime
from promoe_bench.strategies.lru import LRUCache

from .test_cli import assert_usage_error, invoke, run_cli

FLAGS = ["--device", "cpu", "--workload", "synthetic", "--num-requests", "4", "--batch-size", "2",
         "--prompt-len", "8", "--gen-len", "12", "--repeats", "3", "--warmup", "1",
         "--link-gbps", "0.5", "--link-latency-us", "20"]
STRATEGIES = "full_gpu,lru,static"


def make_run(checkpoints, out, *extra):
    result = run_cli(checkpoints["mixtral"], out, "--strategy", STRATEGIES, *extra, tiny=FLAGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def base(checkpoints, tmp_path_factory):
    return make_run(checkpoints, tmp_path_factory.mktemp("compare") / "base")


@pytest.fixture(scope="module")
def rerun(checkpoints, tmp_path_factory):
    return make_run(checkpoints, tmp_path_factory.mktemp("compare") / "rerun")


def gate(base, new, *options):
    result = invoke("compare", base, new, "--format", "json", *options)
    document = json.loads(result.stdout) if result.exit_code in (0, 1) else None
    return result, document


def regressed(document) -> set[tuple[str, str]]:
    return {(row["strategy"], row["metric"]) for row in document["rows"] if row["verdict"] == "regressed"}


def test_a_run_compared_with_itself_passes(base):
    result, document = gate(base, base)
    assert result.exit_code == 0 and document["regressions"] == 0
    assert len(document["rows"]) == 3 * 8 and {row["verdict"] for row in document["rows"]} == {"ok"}


def test_a_rerun_on_the_same_machine_passes(checkpoints, base, rerun, tmp_path):
    result, document = gate(base, rerun)
    if result.exit_code == 1 and {row["kind"] for row in document["rows"] if row["verdict"] == "regressed"} == {"time"}:
        # a stall of this shared 2-core machine through one strategy's repeats (seen once: full_gpu 53% slower
        # in all three) is what a CI job is rerun for; a real slowdown would regress again
        result, document = gate(base, make_run(checkpoints, tmp_path / "again"))
    assert result.exit_code == 0, [row for row in document["rows"] if row["verdict"] == "regressed"]
    counters = [row for row in document["rows"] if row["kind"] == "counter"]
    assert counters and all(row["base"] == row["new"] for row in counters)  # what lru and static copy is fixed


def test_a_strategy_made_to_miss_more_is_caught(checkpoints, base, tmp_path, monkeypatch):
    # plant a regression: lru gives one of its cache slots away
    monkeypatch.setattr(LRUCache, "capacity", lambda self, num_experts, budgeted: budgeted - 1)
    planted = make_run(checkpoints, tmp_path / "planted")
    result, document = gate(base, planted)
    assert result.exit_code == 1
    assert {("lru", "misses"), ("lru", "copied_bytes")} <= regressed(document)
    # nothing else copies differently (wall-clock times are left out: a machine stall through one strategy's
    # repeats once made full_gpu's TPOT regress here)
    assert not {(row["strategy"], row["metric"]) for row in document["rows"]
                if row["verdict"] == "regressed" and row["kind"] == "counter" and row["strategy"] != "lru"}
    relaxed, document = gate(base, planted, "--metric", "lru:misses=1000%", "--metric", "lru:copied_bytes=1000%",
                             "--metric", "evictions=1000%", "--metric", "hits=1000%", "--only", "counter")
    assert relaxed.exit_code == 0, regressed(document)  # per-strategy and per-metric thresholds


def test_a_slower_run_is_caught_and_the_markdown_says_so(checkpoints, base, tmp_path, monkeypatch):
    import time

    forward = OffloadRuntime.forward_experts

    def slow(self, *args):
        time.sleep(0.002)  # 2 ms more per MoE layer
        return forward(self, *args)

    monkeypatch.setattr(OffloadRuntime, "forward_experts", slow)
    slower = make_run(checkpoints, tmp_path / "slower")
    result, document = gate(base, slower)
    assert result.exit_code == 1
    assert {("full_gpu", "tpot_ms"), ("full_gpu", "decode_tok_s")} <= regressed(document)
    assert not {row for row in regressed(document) if row[1] in ("misses", "copied_bytes")}
    markdown = invoke("compare", base, slower, "--format", "markdown")
    assert markdown.exit_code == 1 and "❌" in markdown.stdout and "| **full_gpu** | **tpot_ms** |" in markdown.stdout


def test_a_baseline_file_stands_for_its_run(base, tmp_path):
    out = tmp_path / "baseline.json"
    assert invoke("baseline", base, "--out", out).exit_code == 0
    result, document = gate(out, base)
    assert result.exit_code == 0 and document["regressions"] == 0
    assert json.loads(out.read_text())["setup"]["kind"] == "real"


def test_runs_of_different_setups_are_refused(checkpoints, base, tmp_path):
    other = make_run(checkpoints, tmp_path / "other", "--cache-rate", "0.75")
    assert_usage_error(invoke("compare", base, other), "different setups", "cache rate (0.5 vs 0.75)")
    document = baseline_document(base)
    changed = json.loads(json.dumps(document))
    changed["setup"]["workload"]["output_tokens"] = 99
    with pytest.raises(UsageError, match="workload"):
        compare(document, changed)
    changed = json.loads(json.dumps(document))
    changed["setup"]["model"] = "another-model"
    with pytest.raises(UsageError, match="model"):
        compare(document, changed)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda tmp: tmp / "nothing-here", "neither a run folder nor a baseline file"),
    (lambda tmp: (tmp / "bad.json").write_text("{") and tmp / "bad.json", "not JSON"),
    (lambda tmp: (tmp / "old.json").write_text('{"format": 0}') and tmp / "old.json", "baseline file of format"),
])
def test_bad_input_is_one_line_and_exit_two(base, tmp_path, make, fragment):
    assert_usage_error(invoke("compare", make(tmp_path), base), fragment)


@pytest.mark.parametrize(("spec", "fragment"), [("tpot_ms", "expected"), ("nope=5%", "NAME one of"),
                                                ("tpot_ms=fast", "not a number"), ("tpot_ms=-1", "not negative")])
def test_bad_thresholds_are_refused(spec, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_thresholds([spec])


def test_thresholds_take_fractions_percentages_and_strategies():
    assert parse_thresholds(["tpot_ms=5%", "lru:misses=0.2", "promoe[distance=1]:hits=0"]) == {
        (None, "tpot_ms"): 0.05, ("lru", "misses"): 0.2, ("promoe[distance=1]", "hits"): 0.0}


def counters_document(kind: str, prefetching: bool, **counters) -> dict:
    """A baseline document of one strategy `s` with these counters (and no timed samples)."""
    values = {"copied_bytes": 1000.0, "hits": 100.0, "misses": 100.0, "evictions": 100.0, **counters}
    return {"format": 1, "setup": {"kind": kind}, "strategies": {"s": {
        "counters": values, "samples": {}, "prefetching": prefetching}}}


@pytest.mark.parametrize(("prefetching", "kind", "change", "verdict"), [
    (True, "real", {"misses": 115.0}, "ok"),  # a prefetch still on the link at its router is a miss: a race
    (True, "real", {"misses": 125.0}, "regressed"),
    (True, "real", {"evictions": 108.0}, "ok"),
    (True, "real", {"evictions": 112.0}, "regressed"),
    (True, "real", {"copied_bytes": 1060.0}, "regressed"),  # bytes barely move with timing: 5%
    (False, "real", {"misses": 101.0}, "regressed"),  # a reactive strategy's counters are exact
    (True, "simulated", {"misses": 101.0}, "regressed"),  # a simulation is deterministic
])
def test_counters_that_move_with_timing_get_a_tolerance_by_how_much_they_move(prefetching, kind, change, verdict):
    rows = compare(counters_document(kind, prefetching), counters_document(kind, prefetching, **change),
                   only="counter")
    changed = rows[rows["metric"] == next(iter(change))]
    assert changed["verdict"].tolist() == [verdict]
    assert set(rows[rows["metric"] != next(iter(change))]["verdict"]) == {"ok"}

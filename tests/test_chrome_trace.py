"""`promoe-bench trace`: a run's timeline as Chrome trace JSON that Perfetto opens."""

import gzip
import json
from collections import defaultdict

import pandas as pd
import pytest

from promoe_bench.results import load_run

from .test_cli import TINY, assert_usage_error, invoke, run_cli

LABELS = ["full_gpu", "lru", "promoe[predictor=gate,distance=1]"]
STRATEGIES = ",".join(LABELS)
GEN_LEN = 4


@pytest.fixture(scope="module")
def run_folder(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "run"
    tiny = [*TINY[:TINY.index("--gen-len")], "--gen-len", str(GEN_LEN), "--repeats", "2", "--warmup", "1",
            "--link-gbps", "0.05", "--link-latency-us", "20", "--batch-size", "2", "--num-requests", "4"]
    result = run_cli(checkpoints["mixtral"], out, "--strategy", STRATEGIES, tiny=tiny)
    assert result.exit_code == 0, result.output
    return out


def export(run_folder, tmp_path, *options) -> list[dict]:
    out = tmp_path / "trace.json"
    result = invoke("trace", run_folder, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["traceEvents"]


def slices(events, **match) -> list[dict]:
    return [e for e in events if e["ph"] == "X" and all(e["args"].get(k) == v for k, v in match.items())]


def test_every_lane_is_well_nested_and_named(run_folder, tmp_path):
    events = export(run_folder, tmp_path)
    names = {(e["pid"], e.get("tid")): e["args"]["name"]
             for e in events if e["name"] in ("process_name", "thread_name")}
    assert {names[(pid, None)] for pid in {e["pid"] for e in events}} == set(LABELS)
    lanes = defaultdict(list)
    for e in slices(events):
        assert e["dur"] >= 0 and e["ts"] >= 0
        lanes[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    assert {names[key] for key in lanes} == {"compute", "predictor", "copy"}
    for key, spans in lanes.items():
        assert spans == sorted(spans, key=lambda se: (se[0], -se[1])), names[key]  # parents first, in time order
        open_ends = []
        for start, end in spans:
            while open_ends and start >= open_ends[-1] - 1e-3:  # microseconds: ts + dur is 1 ns exact
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-3, (names[key], start, end, open_ends[-1])
            open_ends.append(end)


def test_steps_follow_one_another_and_copy_bytes_sum_to_the_runs_totals(run_folder, tmp_path):
    events = export(run_folder, tmp_path)
    _, tables = load_run(run_folder)
    layers = tables["layers"]
    first_measured = layers.loc[~layers["warmup"], "repeat"].min()
    process = {e["args"]["name"]: e["pid"] for e in events if e["name"] == "process_name"}
    for label, pid in process.items():
        steps = [e for e in slices(events) if e["pid"] == pid and e["name"].startswith("step ")]
        assert len(steps) == 2 * GEN_LEN  # two batches of GEN_LEN steps, the first measured repeat only
        ends = [s["ts"] + s["dur"] for s in steps]
        assert all(later["ts"] >= end - 1e-3 for later, end in zip(steps[1:], ends, strict=False))
        copied = sum(e["args"]["bytes"] for e in slices(events) if e["pid"] == pid and e["cat"] == "copy")
        own = layers[(layers["strategy"] == label) & (layers["repeat"] == first_measured)]
        assert copied == own["bytes"].sum()
        if label != "full_gpu":
            assert copied > 0
            counters = {e["name"] for e in events if e["ph"] == "C" and e["pid"] == pid}
            assert {"copy bytes in flight", "cache occupancy"} <= counters
    chunk = next(e for e in slices(events) if e["cat"] == "copy")
    assert {"layer", "expert", "priority", "bytes", "queued_ms", "preempted"} <= set(chunk["args"])


def test_strategy_repeat_and_steps_select(run_folder, tmp_path):
    events = export(run_folder, tmp_path, "--strategy", "lru", "--steps", "1:3", "--repeat", "2")
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {"lru"}
    assert {e["args"]["step"] for e in slices(events)} == {1, 2}
    warmup = export(run_folder, tmp_path, "--strategy", "lru", "--steps", "0", "--repeat", "0")
    assert {e["args"]["step"] for e in slices(warmup)} == {0}


def test_the_cap_keeps_whole_steps_in_order_and_says_so(run_folder, tmp_path):
    full = export(run_folder, tmp_path, "--strategy", "lru")
    per_step = defaultdict(int)
    for e in slices(full):
        per_step[(e["args"]["batch"], e["args"]["step"])] += 1
    out = tmp_path / "capped.json"
    result = invoke("trace", run_folder, "--strategy", "lru", "--out", out, "--max-events", sum(per_step.values()) - 1)
    assert result.exit_code == 0, result.output
    assert "kept the first" in result.stderr
    capped = json.loads(out.read_text())["traceEvents"]
    kept = {(e["args"]["batch"], e["args"]["step"]) for e in slices(capped)}
    assert kept == set(sorted(per_step)[:len(kept)]) and 0 < len(kept) < len(per_step)


@pytest.mark.parametrize(("options", "fragment"), [
    (["--steps", "3:1"], "--steps"),
    (["--steps", "x"], "--steps"),
    (["--steps", "40:"], "no steps"),
    (["--strategy", "nope"], "nope"),
    (["--repeat", "9"], "--repeat 9"),
    (["--max-events", "0"], "--max-events"),
    (["--max-events", "3"], "--max-events"),
])
def test_bad_selections_are_one_line_errors_and_write_nothing(run_folder, tmp_path, options, fragment):
    out = tmp_path / "trace.json"
    assert_usage_error(invoke("trace", run_folder, "--out", out, *options), fragment)
    assert not out.exists()


def test_a_folder_that_is_not_a_run_or_a_damaged_timeline_is_refused(run_folder, tmp_path):
    out = tmp_path / "trace.json"
    out.write_text("keep me")
    assert_usage_error(invoke("trace", tmp_path, "--out", out), "not a promoe-bench run folder")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in run_folder.iterdir():
        if item.is_file():
            (damaged / item.name).write_bytes(item.read_bytes())
    assert_usage_error(invoke("trace", damaged, "--out", out), "no timeline")
    (damaged / "timeline").mkdir()
    (damaged / "timeline" / "0.csv.gz").write_bytes(gzip.compress(b"")[:5])  # truncated
    assert_usage_error(invoke("trace", damaged, "--out", out), "0.csv.gz")
    assert out.read_text() == "keep me"


def test_timeline_rows_are_loadable_with_their_types(run_folder):
    from promoe_bench.results import load_timeline

    timeline = load_timeline(run_folder)
    assert str(timeline["expert"].dtype) == "Int64" and str(timeline["step"].dtype) == "Int64"
    assert list(dict.fromkeys(timeline["strategy"])) == LABELS
    warm = timeline[timeline["warmup"]]
    assert set(warm["repeat"]) == {0} and not warm.empty  # warm-up is recorded (and only excluded from figures)
    assert pd.api.types.is_float_dtype(timeline["start_s"])

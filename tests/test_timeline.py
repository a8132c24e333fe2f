"""The timeline a runtime records: its schema, its nesting and its agreement with the per-layer counters."""

import pandas as pd
import pytest
import torch

from promoe_bench.bench import strategy_capacity
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.generation import generate
from promoe_bench.links import EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.strategies import parse
from promoe_bench.timeline import COLUMNS, LANES, frame

from .runtime_helpers import run_generation

SLOW_LINK = dict(gbps=0.05, latency_us=20.0)  # copies take longer than compute: stalls and preemptions


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return load_checkpoint(str(checkpoints["mixtral"]), torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(loaded):
    """spec -> (layer rows, timeline) of one generation."""
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    out = {}
    for spec in ("lru", "promoe[predictor=gate,distance=1]", "full_gpu"):
        _, runtime = run_generation(loaded, spec, ids, 5, link=EmulatedLink(**SLOW_LINK))
        out[spec] = (pd.DataFrame(runtime.recorder.rows), frame(runtime.recorder.timeline))
    return out


def assert_well_nested(slices: pd.DataFrame):
    """Each slice lies inside the one open before it, or starts after it ended."""
    open_ends: list[float] = []
    for start, end in sorted(zip(slices["start_s"], slices["end_s"], strict=True), key=lambda se: (se[0], -se[1])):
        while open_ends and start >= open_ends[-1]:
            open_ends.pop()
        assert not open_ends or end <= open_ends[-1], (start, end, open_ends[-1])
        open_ends.append(end)


@pytest.mark.parametrize("spec", ["lru", "promoe[predictor=gate,distance=1]", "full_gpu"])
def test_schema_and_times(runs, spec):
    _, timeline = runs[spec]
    assert set(COLUMNS) <= set(timeline.columns)
    assert set(timeline["lane"]) <= set(LANES)
    assert (timeline["end_s"] >= timeline["start_s"]).all()
    assert (timeline["start_s"] >= 0).all()
    steps = timeline[timeline["kind"] == "step"].sort_values("step")
    assert list(steps["step"]) == list(range(5))
    assert (steps["start_s"].iloc[1:].to_numpy() >= steps["end_s"].iloc[:-1].to_numpy()).all()  # one after another


@pytest.mark.parametrize("spec", ["lru", "promoe[predictor=gate,distance=1]"])
def test_lanes_are_well_nested(runs, spec):
    _, timeline = runs[spec]
    for lane in ("compute", "predictor", "copy"):
        assert_well_nested(timeline[timeline["lane"] == lane])
    copies = timeline[timeline["lane"] == "copy"].sort_values("start_s")
    assert (copies["start_s"].iloc[1:].to_numpy() >= copies["end_s"].iloc[:-1].to_numpy()).all()  # one link


@pytest.mark.parametrize("spec", ["lru", "promoe[predictor=gate,distance=1]", "full_gpu"])
def test_copy_bytes_and_experts_agree_with_the_layer_rows(runs, spec):
    layers, timeline = runs[spec]
    copies = timeline[timeline["lane"] == "copy"]
    per_step = copies.groupby("step")["bytes"].sum().reindex(range(5), fill_value=0)
    assert per_step.tolist() == layers.groupby("step")["bytes"].sum().tolist()
    experts = timeline[timeline["kind"] == "expert"].groupby(["step", "layer"]).size()
    routed = layers.set_index(["step", "layer"])["routed"].map(lambda r: len(str(r).split()))
    assert experts.sort_index().tolist() == routed.sort_index().tolist()
    if spec == "full_gpu":
        assert copies.empty
        assert timeline[timeline["kind"] == "stall"].empty


def test_copies_carry_their_request_and_preemption(runs):
    _, timeline = runs["promoe[predictor=gate,distance=1]"]
    copies = timeline[timeline["lane"] == "copy"]
    assert set(copies["priority"]) == {"HIGH", "LOW"}
    assert (copies["queued_s"] <= copies["start_s"]).all()
    preempted = copies[copies["preempted"].astype(bool)]
    assert (preempted["priority"] == "LOW").all()  # early preemption drops only speculative copies
    lru_copies = runs["lru"][1].query("lane == 'copy'")
    assert set(lru_copies["priority"]) == {"HIGH"} and not lru_copies["preempted"].astype(bool).any()
    predictions = timeline[timeline["kind"] == "predict"]
    assert not predictions.empty and (predictions["target"] == predictions["layer"] + 1).all()


def test_stalls_in_the_timeline_are_the_layer_rows_stall_time(runs):
    layers, timeline = runs["lru"]
    stalls = timeline[timeline["kind"] == "stall"]
    assert not stalls.empty
    by_layer = (stalls["end_s"] - stalls["start_s"]).groupby([stalls["step"], stalls["layer"]]).sum()
    expected = layers.set_index(["step", "layer"])["stall_s"]
    assert by_layer.reindex(expected.index, fill_value=0.0).to_numpy() == pytest.approx(expected.to_numpy())


def test_without_detail_only_steps_are_timed(loaded):
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    _, detailed = run_generation(loaded, "lru", ids, 3)
    strategy = parse("lru")
    runtime = OffloadRuntime(loaded, strategy, strategy_capacity(strategy, loaded, 0.5, None),
                             EmulatedLink(**SLOW_LINK), torch.device("cpu"), detail=False)
    try:
        generate(loaded.model, ids, 3, runtime)
    finally:
        runtime.close()
    timeline = frame(runtime.recorder.timeline)
    assert set(timeline["kind"]) == {"step"} and len(timeline) == 3
    plain, full = pd.DataFrame(runtime.recorder.rows), pd.DataFrame(detailed.recorder.rows)
    assert plain["non_expert_s"].isna().all()
    waited = plain["ready"] < plain["routed"].map(lambda r: len(str(r).split()))
    assert waited.any() and (plain["stall_s"] > 0).equals(waited)  # waits for copies are timed all the same
    for counter in ("hits", "misses", "bytes", "copies"):  # counting does not depend on timing
        assert plain[counter].tolist() == full[counter].tolist()

"""The prompt bound: no strategy fills a simulated prompt faster, and it counts the copies a prompt cannot
avoid; `promoe-bench bound` prints it and refuses runs it cannot bound."""

import json
import shutil

import pytest

from promoe_bench.bounds import prompt_bounds
from promoe_bench.results import load_run

from .test_cli import assert_usage_error, invoke
from .test_simulator import simulate

STRATEGIES = "full_gpu,on_demand,lru,static,promoe[predictor=noisy],oracle"


@pytest.fixture
def projected(synthetic, model_profile, tmp_path):
    out = tmp_path / "sim"
    # the emulated link's profile: copies outweigh this small model's compute, as in a long prompt of a real one
    result = simulate(synthetic, model_profile, out, "--strategy", STRATEGIES, "--cache-rate", "0.25,0.5",
                      "--hardware", "cpu-emulated")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("rate", ["0.25", "0.5"])
def test_no_strategy_fills_a_prompt_faster_than_the_bound(projected, rate):
    meta, tables = load_run(projected)
    bounds = prompt_bounds(meta, tables, f"lru[cache_rate={rate}]")
    requests = tables["requests"][~tables["requests"].warmup].set_index(["repeat", "batch"])
    full_gpu = requests[requests.strategy == "full_gpu"].ttft_s.groupby(level=[0, 1]).first()
    assert (bounds.routed > meta["strategies"][f"lru[cache_rate={rate}]"]["cache_slots_per_layer"]).all()
    assert (bounds.bound_s > full_gpu * 1.5).all()  # the copies the prompts cannot avoid are counted
    rated = [label for label in meta["strategies"] if f"cache_rate={rate}," in label.replace("]", ",")]
    assert len(rated) == 5
    for label in rated:
        ttft = requests[requests.strategy == label].ttft_s.groupby(level=[0, 1]).first()
        assert (ttft >= bounds.bound_s * (1 - 1e-9)).all(), label


def test_the_bound_command_prints_the_bound_and_each_strategy_against_it(projected):
    result = invoke("bound", projected, "--strategy", "lru[cache_rate=0.25]")
    assert result.exit_code == 0, result.output
    meta, tables = load_run(projected)
    bound_ms = prompt_bounds(meta, tables, "lru[cache_rate=0.25]").bound_s.median() * 1e3
    assert f"could reach: {bound_ms:.1f} ms" in result.output
    assert "oracle[cache_rate=0.25]" in result.output and "cache_rate=0.5" not in result.output


def test_runs_the_bound_cannot_be_made_of_are_refused(synthetic, model_profile, projected, tmp_path):
    assert_usage_error(invoke("bound", projected), "no strategy 'lru'")
    without = tmp_path / "without"
    assert simulate(synthetic, model_profile, without, "--strategy", "lru").exit_code == 0
    assert_usage_error(invoke("bound", without), "full_gpu")
    untimed = tmp_path / "untimed"
    assert simulate(synthetic, model_profile, untimed, "--strategy", "full_gpu,lru", "--no-timeline").exit_code == 0
    assert_usage_error(invoke("bound", untimed), "--no-timeline")
    assert_usage_error(invoke("bound", tmp_path / "nowhere"), "not a promoe-bench run folder")
    measured = tmp_path / "measured"  # a replay of a CPU run's own costs: its link has no set bandwidth here
    shutil.copytree(projected, measured)
    meta = json.loads((measured / "run.json").read_text())
    meta["strategies"]["lru[cache_rate=0.5]"]["link"]["costs"] = {"kind": "measured"}
    (measured / "run.json").write_text(json.dumps(meta))
    assert_usage_error(invoke("bound", measured, "--strategy", "lru[cache_rate=0.5]"), "no set bandwidth")

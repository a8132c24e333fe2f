"""What else the process does while a run is timed or a log replays: on the CPU a run leaves one core to the
emulated link's copy worker, and no garbage collection falls inside a batch's generation or a repeat's replay."""

import gc
import json

import pytest
import torch

from promoe_bench import bench
from promoe_bench.costs import CostModel, ProfileCosts
from promoe_bench.profiles import load_hardware, load_model_profile
from promoe_bench.quiet import collector_held, compute_threads, torch_threads
from promoe_bench.routing_synthetic import synthetic_log
from promoe_bench.simulate import SimConfig, simulate_strategy
from promoe_bench.simulator import Simulation
from promoe_bench.strategies import parse

from .test_cli import run_cli


def test_torch_threads_sets_the_count_inside_and_restores_it_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(3):
        assert torch.get_num_threads() == 3
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_compute_threads_leave_a_core_to_the_emulated_link_on_the_cpu_only():
    with torch_threads(4):
        assert compute_threads(torch.device("cpu")) == 3
        assert compute_threads(torch.device("cuda")) == 4  # a GPU's copy engine needs no core
    with torch_threads(1):
        assert compute_threads(torch.device("cpu")) == 1  # never none


def test_collector_held_disables_automatic_collection_inside_only():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_held():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_held():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_a_cpu_run_generates_on_one_core_fewer_and_without_collections(checkpoints, tmp_path, monkeypatch):
    seen = []

    def watched_generate(*args, **kwargs):
        seen.append((torch.get_num_threads(), gc.isenabled()))
        return generate(*args, **kwargs)

    generate = bench.generate
    monkeypatch.setattr(bench, "generate", watched_generate)
    with torch_threads(2):
        result = run_cli(checkpoints["mixtral"], tmp_path / "run", "--strategy", "full_gpu,lru")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2  # given back after the run
    assert seen and set(seen) == {(1, False)}
    assert gc.isenabled()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["environment"]["compute_threads"] == 1


def test_a_simulation_replays_without_collections(monkeypatch, tmp_path):
    seen = []

    def watched_forward(self, f, **context):
        seen.append(gc.isenabled())
        return forward(self, f, **context)

    forward = Simulation.forward
    monkeypatch.setattr(Simulation, "forward", watched_forward)
    log = synthetic_log(2, 8, 2, prompt_tokens=4, decode_steps=3, seed=0)
    model = CostModel(load_hardware("rtx4090"), load_model_profile("mixtral-8x7b"), "int4")
    third = model.expert_bytes // 3
    chunks = (third, third, model.expert_bytes - 2 * third)
    run = simulate_strategy(log, parse("lru"), 4, ProfileCosts(model, log), chunks,
                            SimConfig(tmp_path / "unused.log", "rtx4090", "mixtral-8x7b", "int4", repeats=2))
    assert len(run.steps) == (1 + 2) * len(log.counts)  # a row per forward of each repeat, warm-up included
    assert seen and not any(seen)
    assert gc.isenabled()

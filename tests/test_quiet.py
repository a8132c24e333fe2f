"""What else the process does while a run is timed: on the CPU a run leaves one core to the emulated link's
copy worker, and no garbage collection falls inside a batch's generation."""

import gc
import json

import pytest
import torch

from promoe_bench import bench
from promoe_bench.quiet import collector_held, compute_threads, torch_threads

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

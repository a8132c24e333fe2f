"""Compute's intra-op threads: on the CPU a run leaves one core to the emulated link's copy worker."""

import json

import pytest
import torch

from promoe_bench import bench
from promoe_bench.threads import compute_threads, torch_threads

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


def test_a_cpu_run_computes_with_one_core_left_to_the_link(checkpoints, tmp_path, monkeypatch):
    seen = []

    def counting_generate(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return generate(*args, **kwargs)

    generate = bench.generate
    monkeypatch.setattr(bench, "generate", counting_generate)
    with torch_threads(2):
        result = run_cli(checkpoints["mixtral"], tmp_path / "run", "--strategy", "full_gpu,lru")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2  # given back after the run
    assert seen and set(seen) == {1}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["environment"]["compute_threads"] == 1

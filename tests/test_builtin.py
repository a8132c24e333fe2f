"""The built-in model: made deterministically in the real format, loaded through the normal path."""

import json

import torch
from safetensors.torch import load_file

from promoe_bench.builtin_model import CONFIG, builtin_checkpoint
from promoe_bench.checkpoint import load_checkpoint


def test_builtin_checkpoint_is_a_real_hf_checkpoint_made_once():
    path = builtin_checkpoint()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == CONFIG["num_local_experts"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin_checkpoint() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_builtin_checkpoint_is_deterministic(tmp_path, monkeypatch):
    first = load_file(builtin_checkpoint() / "model.safetensors")
    monkeypatch.setenv("PROMOE_BENCH_CACHE", str(tmp_path))
    second = load_file(builtin_checkpoint() / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_builtin_loads_through_the_checkpoint_path():
    loaded = load_checkpoint(str(builtin_checkpoint()), torch.device("cpu"))
    assert loaded.store.num_layers == CONFIG["num_hidden_layers"]
    assert loaded.store.num_experts == CONFIG["num_local_experts"]
    assert loaded.top_k == CONFIG["num_experts_per_tok"]
    assert loaded.report.peak_over_checkpoint < 1.5

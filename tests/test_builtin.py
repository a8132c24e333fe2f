"""The built-in model: a trained checkpoint shipped in the real format, loaded through the normal path."""

import json

import torch

from promoe_bench.builtin_model import builtin_checkpoint, builtin_config
from promoe_bench.checkpoint import load_checkpoint

from .runtime_helpers import run_generation


def test_builtin_is_a_hf_checkpoint_with_its_own_tokenizer_and_card():
    path = builtin_checkpoint()
    config = builtin_config()
    assert config["model_type"] == "mixtral"
    assert 6 <= config["num_hidden_layers"] <= 8
    assert config["num_local_experts"] >= 32 and config["num_experts_per_tok"] >= 4
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    for name in ("tokenizer.json", "README.md", "training.json"):
        assert (path / name).is_file(), name
    training = json.loads((path / "training.json").read_text())
    assert training["final_heldout_loss"] < training["history"][0]["heldout_loss"]


def test_builtin_loads_through_the_checkpoint_path_and_tokenizes_text():
    loaded = load_checkpoint(str(builtin_checkpoint()), torch.device("cpu"))
    config = builtin_config()
    assert (loaded.store.num_layers, loaded.store.num_experts, loaded.top_k) == (
        config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"])
    ids = loaded.tokenize("Return the number of items in a container.")
    assert loaded.tokenizer.decode(ids) == "Return the number of items in a container."


def test_builtin_generates_deterministically_under_offloading():
    loaded = load_checkpoint(str(builtin_checkpoint()), torch.device("cpu"))
    ids = torch.tensor([loaded.tokenize("The list type is a mutable sequence")])
    first, _ = run_generation(loaded, "lru", ids, 12)
    second, _ = run_generation(loaded, "on_demand", ids, 12)
    assert torch.equal(first.tokens, second.tokens)
    text = loaded.tokenizer.decode(first.tokens[0])
    assert len(text.strip()) > 0

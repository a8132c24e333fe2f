import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from promoe_bench.quiet import torch_threads
from promoe_bench.routing_synthetic import synthetic_log

from .checkpoints import FAMILIES, write_checkpoint

# The session's learned predictors for the tiny mixtral checkpoint: its 3 MoE layers allow distances 1 and
# 2 (promoe's default distance is 2); the tiny models have no tokenizer, so only the synthetic workload works.
MIXTRAL_PREDICTOR_DISTANCES = [1, 2]
MIXTRAL_PREDICTOR_TRAINING = ["--workload", "synthetic", "--num-requests", "10", "--gen-len", "4",
                              "--distance", "1..2", "--device", "cpu"]


def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the spinning
    threads make small training loops many times slower; the thread count is restored afterwards."""
    return torch_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> folder of a tiny checkpoint of that family (made once per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def mixtral_predictor_training(checkpoints):
    """`train-predictor` run once per session on the tiny mixtral checkpoint, through the real command,
    into the folder `run` looks in by default (<model>/promoe_predictors): `folder` and the CLI `result`.
    Only the mixtral folder gets predictors; every other tiny checkpoint stays without."""
    from promoe_bench.cli import main

    folder = checkpoints["mixtral"] / "promoe_predictors"
    with one_torch_thread():
        result = CliRunner().invoke(main, ["train-predictor", "--model", str(checkpoints["mixtral"]),
                                           *MIXTRAL_PREDICTOR_TRAINING, "--out", str(folder)])
    assert result.exit_code == 0, (result.output, result.exc_info)
    return SimpleNamespace(folder=folder, result=result)


@pytest.fixture(scope="session")
def mixtral_predictors(mixtral_predictor_training):
    """The tiny mixtral's learned predictors folder: with it, `--strategy all` (promoe included) runs
    on that checkpoint."""
    return mixtral_predictor_training.folder


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small SYNTHETIC routing log (4 layers, 16 experts, top-2, two batches) for simulations."""
    path = tmp_path_factory.mktemp("synth") / "synthetic.log"
    synthetic_log(num_layers=4, num_experts=16, top_k=2, prompt_tokens=24, decode_steps=40, batches=2,
                  skew=1.0, repeat=0.3, cross_layer=0.5, seed=3).save(path)
    return path


@pytest.fixture
def model_profile(tmp_path):
    """A mixtral-shaped config with the synthetic log's shape (4 MoE layers, 16 experts, top-2)."""
    config = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "num_local_experts": 16,
              "num_experts_per_tok": 2, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path

"""Offloading never changes the model's output: every strategy, every family, against transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.generation import left_pad

from .checkpoints import FAMILIES
from .runtime_helpers import run_generation, untrained_predictors

STRATEGIES = ["full_gpu", "on_demand", "lru", "lru[cache_rate=0.25]", "static", "skip_gate", "oracle",
              "promoe", "promoe[predictor=gate]", "promoe[predictor=oracle,cache_rate=0.25]",
              "promoe[chunked=0]", "promoe[preempt=0]", "promoe[reorder=0]", "promoe[distance=1]",
              "promoe[chunked=0,preempt=0,reorder=0,cache_rate=0.25]"]
GEN_LEN = 6


@pytest.fixture(scope="module")
def references(checkpoints):
    """family -> (ids, mask, tokens, logits) from transformers' own generate() with its eager experts, on
    a batch of prompts of different lengths (left-padded)."""
    out = {}
    generator = torch.Generator().manual_seed(1)
    for family, folder in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
        prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=generator).tolist() for n in (9, 4, 6)]
        ids, mask = left_pad(prompts, pad_id=0)
        generated = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                                   max_new_tokens=GEN_LEN, output_logits=True, return_dict_in_generate=True)
        out[family] = (ids, mask, generated.sequences[:, ids.shape[1]:], torch.stack(generated.logits, dim=1))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_strategy_reproduces_transformers_generate(family, checkpoints, references):
    loaded = load_checkpoint(str(checkpoints[family]), torch.device("cpu"))
    ids, mask, want_tokens, want_logits = references[family]
    predictors = untrained_predictors(loaded, distances=(1, 2))  # random guesses: outputs must not care
    for spec in STRATEGIES:
        result, runtime = run_generation(loaded, spec, ids, GEN_LEN, attention_mask=mask, predictors=predictors)
        assert torch.equal(result.tokens, want_tokens), f"{family}/{spec}: greedy tokens differ"
        torch.testing.assert_close(result.logits, want_logits, rtol=1e-4, atol=1e-5, msg=f"{family}/{spec}")
        misses = sum(row["misses"] for row in runtime.recorder.rows)
        if "cache_rate=0.25" in spec:
            assert misses > 0, "a quarter cache must miss, or this test does not exercise offloading"
        if spec.startswith(("promoe", "skip_gate", "oracle")):
            guessed = [row for row in runtime.recorder.rows if row["predicted"]]
            assert guessed, f"{family}/{spec}: no layer was predicted, so prefetching went untested"

"""The host never waits for the device inside a forward but where it must: one routing read per MoE layer
and one read per prediction made from hidden states, nothing per expert, under every strategy.

Counted on the CPU with tests/sync_audit.py: the calls that would stop the host on a GPU, by who made them.
"""

import pytest
import torch

from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.generation import generate, left_pad
from promoe_bench.sync_audit import StepSyncs, SyncAudit

from .runtime_helpers import make_runtime, untrained_predictors

STRATEGIES = ["full_gpu", "on_demand", "lru", "lru[chunked=1]", "static", "skip_gate", "oracle", "promoe",
              "promoe[predictor=gate]", "promoe[chunked=0]", "promoe[predictor=oracle,cache_rate=0.25]"]
GEN_LEN = 4


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    loaded = load_checkpoint(str(checkpoints["mixtral"]), torch.device("cpu"))
    return loaded, untrained_predictors(loaded, distances=(1, 2))


@pytest.mark.parametrize("prompts", [[[5, 9, 3, 7, 1, 4]], [[5, 9, 3, 7, 1, 4], [8, 2, 6]]],
                         ids=["one prompt", "two prompts, padded"])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_a_forward_reads_the_device_once_per_layer_and_once_per_prediction(mixtral, spec, prompts):
    loaded, predictors = mixtral
    ids, mask = left_pad(prompts, pad_id=0)
    runtime = make_runtime(loaded, spec, ids, GEN_LEN, attention_mask=mask, predictors=predictors)
    audit = SyncAudit()
    steps = StepSyncs(runtime, audit)
    wrapped = runtime.forward_experts
    experts_calls = []
    runtime.forward_experts = lambda *args: experts_calls.append(args[0]) or wrapped(*args)
    try:
        with audit:
            generate(loaded.model, ids, GEN_LEN, runtime, attention_mask=mask, strategy=spec, batch=0)
    finally:
        runtime.close()
    per_step, layers = steps.per_step(), loaded.store.num_layers
    assert len(experts_calls) == GEN_LEN * layers
    assert audit.calls.pop(("offload.forward_experts", "tolist")) == len(experts_calls)  # the routing read
    if sum(steps.predictions):
        assert audit.calls.pop(("predictors.rank", "cpu")) == sum(steps.predictions)  # one copy each
    # once per generation, outside the steps: the prompt mask (still a host tensor) before the first step is
    # counted and tested for padding, and the generated tokens come back after the last one
    for once in ("__int__", "__bool__", "cpu"):
        assert audit.calls.pop(("generation.generate", once)) == 1, once
    ours = {call: n for call, n in audit.calls.items() if call[0] != "transformers"}
    assert not ours, f"{spec}: promoe_bench reads the device where it need not: {ours}"
    # per step: one read per layer and per prediction, and transformers' own, testing the padding mask where
    # there is one, once or twice a step (never per layer: there are 3)
    mask_tests = [n - layers - predicted for n, predicted in zip(per_step, steps.predictions, strict=True)]
    mask_tests[-1] -= 1  # the tokens' read
    assert all(0 < n <= 2 for n in mask_tests) if len(prompts) > 1 else not any(mask_tests), mask_tests

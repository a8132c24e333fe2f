"""The host never waits for the device inside a forward but where it must: one routing read per MoE layer
and one read per prediction made from hidden states, nothing per expert, under every strategy.

Counted on the CPU with tests/sync_audit.py: the calls that would stop the host on a GPU, by who made them.
"""

import pytest
import torch

from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.generation import generate, left_pad
from promoe_bench.offload import OffloadRuntime

from .runtime_helpers import make_runtime, untrained_predictors
from .sync_audit import SyncAudit

STRATEGIES = ["full_gpu", "on_demand", "lru", "lru[chunked=1]", "static", "skip_gate", "oracle", "promoe",
              "promoe[predictor=gate]", "promoe[chunked=0]", "promoe[predictor=oracle,cache_rate=0.25]"]
GEN_LEN = 4


class CountedRuntime:
    """Counts the experts calls and the predictions a runtime makes from hidden states, step by step."""

    def __init__(self, runtime: OffloadRuntime):
        self.experts_calls = self.hidden_predictions = 0
        forward_experts, predict = runtime.forward_experts, runtime.predict

        def counted_forward(*args):
            self.experts_calls += 1
            return forward_experts(*args)

        def counted_predict(layer, target, predictor, *args):
            self.hidden_predictions += predictor in ("learned", "gate")
            return predict(layer, target, predictor, *args)

        runtime.forward_experts, runtime.predict = counted_forward, counted_predict


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
    counted = CountedRuntime(runtime)
    audit = SyncAudit()
    try:
        with audit:
            generate(loaded.model, ids, GEN_LEN, runtime, attention_mask=mask, strategy=spec, batch=0)
    finally:
        runtime.close()
    calls = audit.by_caller()
    layers = loaded.store.num_layers
    assert counted.experts_calls == GEN_LEN * layers
    assert audit.calls.pop(("offload.forward_experts", "tolist")) == counted.experts_calls  # the routing read
    if counted.hidden_predictions:
        assert audit.calls.pop(("predictors.rank", "cpu")) == counted.hidden_predictions  # one copy each
    # once per generation, outside the steps: the prompt mask (still a host tensor) before the first step is
    # counted and tested for padding, and the generated tokens come back after the last one
    for once in ("__int__", "__bool__", "cpu"):
        assert audit.calls.pop(("generation.generate", once)) == 1, once
    ours = {call: n for call, n in audit.calls.items() if call[0] != "transformers"}
    assert not ours, f"{spec}: promoe_bench reads the device where it need not: {ours}"
    # transformers' own, outside any experts call: testing the padding mask, where there is one, once or twice
    # a step (never per layer: there are 3)
    if len(prompts) > 1:
        assert GEN_LEN <= calls["transformers"] <= 2 * GEN_LEN
    else:
        assert calls["transformers"] == 0

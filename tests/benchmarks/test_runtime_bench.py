"""Benchmarks (pytest-benchmark). Run them with:  pytest tests/benchmarks --benchmark-enable

- the emulated link's achieved bandwidth against its setting (extra_info: setting, achieved, ratio);
- one decode step of the offload runtime under full_gpu against transformers' own forward on the same
  model (same group: the table's ratio column is the runtime's per-step overhead).

In the normal test run (--benchmark-disable) each body runs once, so they stay working.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.links import EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.strategies import parse

from ..checkpoints import write_checkpoint

PROMPT = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gbps", [0.25, 2.0])
def test_emulated_link_bandwidth(benchmark, gbps):
    link = EmulatedLink(gbps=gbps, latency_us=20.0)
    src, dst = torch.randn(256 * 1024), torch.empty(256 * 1024)  # 1 MiB, about one expert chunk scale
    benchmark.pedantic(link.copy, args=(dst, src), rounds=30, warmup_rounds=2)
    achieved = link.counters.achieved_gbps
    expected = src.nbytes / (src.nbytes / (gbps * 1e9) + 20e-6) / 1e9  # bandwidth with the latency included
    benchmark.extra_info.update(setting_gbps=gbps, achieved_gbps=achieved, achieved_over_expected=achieved / expected)
    assert torch.equal(dst, src)  # the pacing figures are reported, not asserted: they are wall-clock


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "mixtral", "mixtral", hidden_size=128,
                            intermediate_size=256, num_local_experts=16, num_hidden_layers=4)


def decode_step(forward):
    """One decode step after a 16-token prefill: the prefill (setup) runs outside the timed call."""
    def setup():
        cache = DynamicCache(config=forward.config)
        forward(PROMPT, cache)
        return (cache,), {}

    def step(cache):
        return forward(PROMPT[:, :1], cache)

    return setup, step


class Forward:
    """model(input_ids, cache) -> logits; with a runtime, each call is one recorded step."""

    def __init__(self, model, runtime=None):
        self.model, self.runtime, self.config = model, runtime, model.config

    @torch.no_grad()
    def __call__(self, input_ids, cache):
        if self.runtime:
            self.runtime.recorder.begin_step(step=0)
        logits = self.model(input_ids=input_ids, cache=cache).logits
        if self.runtime:
            self.runtime.finish_step()
        return logits


@pytest.mark.benchmark(group="decode step: offload runtime (full_gpu) vs transformers")
def test_decode_step_transformers_forward(benchmark, mixtral_folder):
    model = AutoModelForCausalLM.from_pretrained(mixtral_folder, dtype=torch.float32)
    setup, step = decode_step(Forward(model))
    logits = benchmark.pedantic(step, setup=setup, rounds=40, warmup_rounds=3)
    assert logits.shape == (1, 1, 96)


@pytest.mark.benchmark(group="decode step: offload runtime (full_gpu) vs transformers")
def test_decode_step_offload_runtime_full_gpu(benchmark, mixtral_folder):
    loaded = load_checkpoint(str(mixtral_folder), torch.device("cpu"))
    runtime = OffloadRuntime(loaded, parse("full_gpu"), 16, EmulatedLink(50, 0), torch.device("cpu"))
    setup, step = decode_step(Forward(loaded.model, runtime))
    try:
        logits = benchmark.pedantic(step, setup=setup, rounds=40, warmup_rounds=3)
    finally:
        runtime.close()
    assert logits.shape == (1, 1, 96)
    assert sum(row["bytes"] for row in runtime.recorder.rows) == 0

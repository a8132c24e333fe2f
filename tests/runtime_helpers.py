"""Run a loaded model under one strategy, the way `promoe-bench run` does, for tests."""

import torch

from promoe_bench.bench import strategy_capacity
from promoe_bench.generation import generate
from promoe_bench.links import EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.strategies import parse

FAST_LINK = dict(gbps=50.0, latency_us=0.0)  # correctness tests need no realistic pacing


def run_generation(loaded, spec: str, input_ids, gen_len: int, cache_rate: float = 0.5, link=None,
                   attention_mask=None):
    strategy = parse(spec)
    runtime = OffloadRuntime(loaded, strategy, strategy_capacity(strategy, loaded, cache_rate, None),
                             link or EmulatedLink(**FAST_LINK), torch.device("cpu"))
    try:
        result = generate(loaded.model, input_ids, gen_len, runtime, attention_mask=attention_mask,
                          keep_logits=True, strategy=spec)
    finally:
        runtime.close()
    return result, runtime

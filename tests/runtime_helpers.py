"""Run a loaded model under one strategy, the way `promoe-bench run` does, for tests."""

import pandas as pd
import torch

from promoe_bench.bench import strategy_capacity
from promoe_bench.generation import generate
from promoe_bench.links import EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.predictors import LearnedPredictors, PredictorMLP
from promoe_bench.strategies import parse
from promoe_bench.trace import RoutingTrace

FAST_LINK = dict(gbps=50.0, latency_us=0.0)  # correctness tests need no realistic pacing


def untrained_predictors(loaded, distances=(1, 2, 3), width=16) -> LearnedPredictors:
    """Randomly initialised learned predictors: wrong guesses galore, which must not change outputs."""
    store, hidden = loaded.store, loaded.config.hidden_size
    mlps = {(src, d): PredictorMLP(hidden, width, store.num_experts).eval()
            for d in distances for src in range(store.num_layers - d)}
    return LearnedPredictors(mlps, loaded.top_k, meta={})


def make_runtime(loaded, spec: str, input_ids, gen_len: int, cache_rate: float = 0.5, link=None,
                 attention_mask=None, predictors: LearnedPredictors | None = None) -> OffloadRuntime:
    """A runtime for `spec`; a strategy that reads the routing gets it from a full_gpu pass first."""
    strategy = parse(spec)
    trace = None
    if strategy.needs_trace:
        _, full = run_generation(loaded, "full_gpu", input_ids, gen_len, attention_mask=attention_mask)
        trace = RoutingTrace.from_layer_rows(pd.DataFrame(full.recorder.rows))
    return OffloadRuntime(loaded, strategy, strategy_capacity(strategy, loaded, cache_rate, None),
                          link or EmulatedLink(**FAST_LINK), torch.device("cpu"),
                          {"learned": predictors} if predictors is not None else None, trace)


def run_generation(loaded, spec: str, input_ids, gen_len: int, cache_rate: float = 0.5, link=None,
                   attention_mask=None, predictors: LearnedPredictors | None = None):
    """Generate under `spec`, keeping the logits: the result and the (closed) runtime."""
    runtime = make_runtime(loaded, spec, input_ids, gen_len, cache_rate, link, attention_mask, predictors)
    try:
        result = generate(loaded.model, input_ids, gen_len, runtime, attention_mask=attention_mask,
                          keep_logits=True, strategy=spec, batch=0)
    finally:
        runtime.close()
    return result, runtime

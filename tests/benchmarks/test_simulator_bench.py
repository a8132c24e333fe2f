"""Simulator replay speed (pytest-benchmark): expert accesses (token x routed expert, as a log holds them)
replayed per second under lru, without a timeline. Run with:  pytest tests/benchmarks --benchmark-enable

- the public Mixtral-8x7B log (batch 1: 135 prompt tokens, 83 decode steps, 32 layers, top-2 of 8) on the
  RTX 4090 profile, int4 experts, half of them cached;
- a synthetic DeepSeek-MoE-16B-shaped log (27 layers, top-6 of 64, 256 prompt tokens, 64 decode steps).
extra_info holds accesses/s and distinct expert accesses (per layer and forward) per second.
"""

import time
from pathlib import Path

import pytest

from promoe_bench.costs import CostModel, ProfileCosts
from promoe_bench.profiles import load_hardware, load_model_profile
from promoe_bench.quiet import collector_held
from promoe_bench.routing_import import import_jsonl
from promoe_bench.routing_synthetic import synthetic_log
from promoe_bench.simulator import Simulation
from promoe_bench.strategies import parse

MIXTRAL_LOG = Path(__file__).resolve().parents[2] / "traces" / "mixtral-8x7b-humaneval-0.jsonl"


def logs():
    return {
        "mixtral-8x7b real log": (import_jsonl(MIXTRAL_LOG), "mixtral-8x7b", "int4"),
        "deepseek-moe-16b synthetic": (synthetic_log(27, 64, 6, prompt_tokens=256, decode_steps=64, seed=0),
                                       "deepseek-moe-16b", "fp16"),
    }


@pytest.mark.parametrize("name", list(logs()))
@pytest.mark.benchmark(group="simulator: lru replay")
def test_lru_replay_speed(benchmark, name):
    log, profile, precision = logs()[name]
    model = CostModel(load_hardware("rtx4090"), load_model_profile(profile), precision)
    costs = ProfileCosts(model, log)
    third = model.expert_bytes // 3
    chunks = (third, third, model.expert_bytes - 2 * third)
    capacity = log.num_experts // 2
    accesses = int((log.experts >= 0).sum())
    distinct = sum(len(layer) for forward in log.layer_routing for layer in forward)
    elapsed = []

    def replay():
        sim = Simulation(log, parse("lru"), capacity, costs, chunks, detail=False)
        start = time.perf_counter()
        with collector_held():  # as `simulate` replays
            for f in range(len(log.counts)):
                sim.forward(f, repeat=0, warmup=False, batch=int(log.forward_batch[f]),
                            step=int(log.forward_step[f]))
        elapsed.append(time.perf_counter() - start)
        return sim

    sim = benchmark.pedantic(replay, rounds=3, warmup_rounds=1)
    best = min(elapsed)
    benchmark.extra_info.update(accesses=accesses, accesses_per_s=round(accesses / best),
                                distinct_accesses_per_s=round(distinct / best))
    layers = sim.recorder.rows
    assert sum(row["hits"] + row["misses"] for row in layers) == distinct  # every access replayed

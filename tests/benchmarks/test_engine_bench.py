"""Benchmarks of the offload machinery (pytest-benchmark; run with --benchmark-enable):

- the copy engine's throughput: every expert of the built-in model requested HIGH and landed, over a link
  as fast as the machine allows (the emulated link at 1000 GB/s on the CPU, the copy stream on CUDA): what
  the engine's own scheduling costs per chunk (extra_info: chunks/s, GB/s);
- one decode step of the built-in model under each strategy that needs no recorded routing, half the
  experts cached, the default link (the emulated one on the CPU). Timed calls end with the device
  synchronised (finish_step does it).
"""

import pytest
import torch

from promoe_bench.builtin_model import BUILTIN_DIR, builtin_checkpoint
from promoe_bench.cache import ExpertCache
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.config import DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US
from promoe_bench.copy_engine import CopyEngine, Priority
from promoe_bench.links import CudaLink, EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.policies import LRU
from promoe_bench.predictors import load_predictors, model_fingerprint
from promoe_bench.slot_pool import SlotPool
from promoe_bench.strategies import BUILTIN, parse

from .test_runtime_bench import Forward, decode_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def builtin():
    return load_checkpoint(str(builtin_checkpoint()), DEVICE)


def link(fast: bool):
    if DEVICE.type == "cuda":
        return CudaLink(DEVICE)
    return EmulatedLink(1000.0, 0.0) if fast else EmulatedLink(DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US)


@pytest.mark.benchmark(group="copy engine throughput")
def test_copy_engine_throughput(benchmark, builtin):
    store = builtin.store
    layout = store.layout
    chunk_bytes = tuple(layout.chunk_numel(c) * layout.dtype.itemsize for c in range(3))
    cache = ExpertCache(store.num_layers, store.num_experts, LRU(store.num_layers), chunk_bytes)
    pool = SlotPool(store.num_layers * store.num_experts, layout, DEVICE)
    engine = CopyEngine(store, pool, cache, link(fast=True))
    experts = [(layer, expert) for layer in range(store.num_layers) for expert in range(store.num_experts)]

    def copy_all():
        for layer, expert in experts:
            engine.request(layer, expert, Priority.HIGH)
        engine.idle()
        for layer, expert in experts:  # make room: the next round copies everything again
            engine.evict(layer, expert)

    try:
        benchmark.pedantic(copy_all, rounds=5, warmup_rounds=1)
        copy_all()
        copied = engine.counters.copies
    finally:
        engine.close()
    if benchmark.stats:
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(chunks_per_s=3 * len(experts) / seconds,
                                    gbps=len(experts) * layout.nbytes / seconds / 1e9)
    assert len(set(copied)) == 1 and copied[0] % store.num_experts == 0 and copied[0] >= 2 * store.num_experts


@pytest.fixture(scope="module")
def learned(builtin):
    predictors = load_predictors(BUILTIN_DIR / "promoe_predictors", model_fingerprint(builtin.config, builtin.layers))
    return {"learned": predictors.to(DEVICE)}


@pytest.mark.parametrize("name", [name for name, cls in BUILTIN.items() if not parse(name).needs_trace])
@pytest.mark.benchmark(group="decode step per strategy (built-in model, half cached)")
def test_decode_step_per_strategy(benchmark, builtin, learned, name):
    strategy = parse(name)
    capacity = builtin.store.num_experts if name == "full_gpu" else builtin.store.num_experts // 2
    runtime = OffloadRuntime(builtin, strategy, capacity, link(fast=False), DEVICE, learned)
    setup, step = decode_step(Forward(builtin.model, runtime))
    try:
        logits = benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=2)
    finally:
        runtime.close()
    assert logits.shape[-1] == builtin.config.vocab_size
    rows = runtime.recorder.rows
    assert sum(row["bytes"] for row in rows) == 0 if name == "full_gpu" else sum(row["misses"] for row in rows) > 0

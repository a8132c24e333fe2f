"""Benchmarks (pytest-benchmark). Run them with:  pytest tests/benchmarks --benchmark-enable

- the emulated link's achieved bandwidth against its setting (extra_info: setting, achieved, ratio);
- one decode step of the offload runtime under full_gpu against the same model with each of transformers' own
  experts implementations, interleaved (extra_info: each one's median and the runtime's over the fastest);
- one decode step of the built-in model under promoe, all experts cached, with the timeline on and off
  (same group: the ratio is the instrumentation's overhead);
- one layer's experts call through the runtime's ExpertsInterface implementation against transformers'
  eager experts (same group: the ratio is the expert dispatch overhead).

In the normal test run (--benchmark-disable) each body runs once, so they stay working.
"""

import statistics
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from promoe_bench.builtin_model import BUILTIN_DIR, builtin_checkpoint
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.copy_engine import Priority
from promoe_bench.links import EmulatedLink
from promoe_bench.offload import OffloadRuntime
from promoe_bench.predictors import load_predictors, model_fingerprint
from promoe_bench.strategies import parse

from ..checkpoints import write_checkpoint
from .conftest import DEVICE

PROMPT = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gbps", [0.25, 2.0])
def test_emulated_link_bandwidth(benchmark, gbps):
    link = EmulatedLink(gbps=gbps, latency_us=20.0)
    src, dst = torch.randn(256 * 1024), torch.empty(256 * 1024)  # 1 MiB, about one expert chunk scale
    benchmark.pedantic(lambda: link.complete(link.issue(dst, src)), rounds=30, warmup_rounds=2)
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
    prompt = PROMPT.to(forward.model.device)

    def setup():
        cache = DynamicCache(config=forward.config)
        forward(prompt, cache)
        return (cache,), {}

    def step(cache):
        return forward(prompt[:, :1], cache)

    return setup, step


class Forward:
    """model(input_ids, cache) -> logits; with a runtime, each call is one recorded step."""

    def __init__(self, model, runtime=None):
        self.model, self.runtime, self.config = model, runtime, model.config

    @torch.no_grad()
    def __call__(self, input_ids, cache):
        if self.runtime:
            self.runtime.begin_step(batch=0, step=0, phase="prefill" if input_ids.shape[1] > 1 else "decode")
        logits = self.model(input_ids=input_ids, cache=cache).logits
        if self.runtime:
            self.runtime.finish_step()  # ends with the device synchronised
        elif logits.is_cuda:
            torch.cuda.synchronize()  # a timed call ends when the device is done
        return logits


TRANSFORMERS_EXPERTS = ("eager", "batched_mm", "grouped_mm")  # transformers' own experts implementations
RUNTIME = "offload runtime (full_gpu)"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """Qwen-MoE's routing shape (60 experts, top-4, a shared expert) at toy sizes."""
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "qwen2_moe", "qwen2_moe", num_experts=60,
                            num_experts_per_tok=4, hidden_size=128, moe_intermediate_size=64, intermediate_size=256,
                            shared_expert_intermediate_size=256, num_hidden_layers=4, vocab_size=512)


@pytest.mark.parametrize("model", ["builtin", "qwen2_moe 60 experts top-4"])
def test_decode_step_full_gpu_against_transformers_experts(benchmark, model, qwen_folder):
    """One decode step of the runtime under full_gpu against the same model with each of transformers' own
    experts implementations, step by step in turn so that the machine's drift hits all alike; extra_info
    holds each one's median step and the runtime's over transformers' fastest (what offloading costs when
    nothing is offloaded). Every model takes the same tokens: their logits must agree."""
    folder = builtin_checkpoint() if model == "builtin" else qwen_folder
    forwards = {impl: Forward(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                   experts_implementation=impl).to(DEVICE))
                for impl in TRANSFORMERS_EXPERTS}
    loaded = load_checkpoint(str(folder), DEVICE)
    runtime = OffloadRuntime(loaded, parse("full_gpu"), loaded.store.num_experts, EmulatedLink(50, 0), DEVICE,
                             detail=False)
    forwards[RUNTIME] = Forward(loaded.model, runtime)
    prompt = PROMPT.to(DEVICE)
    caches, seconds, logits = {}, {name: [] for name in forwards}, {}

    def step_each():
        if len(seconds[RUNTIME]) % 16 == 0:  # a fresh 16-token prompt now and then: the KV cache stays short
            caches.update({name: DynamicCache(config=forward.config) for name, forward in forwards.items()})
            for name, forward in forwards.items():
                forward(prompt, caches[name])
        names = list(forwards)
        shift = len(seconds[RUNTIME]) % len(names)  # none always goes first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            logits[name] = forwards[name](prompt[:, :1], caches[name])
            seconds[name].append(time.perf_counter() - start)

    try:
        benchmark.pedantic(step_each, rounds=200, warmup_rounds=10)
    finally:
        runtime.close()
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    fastest = min(TRANSFORMERS_EXPERTS, key=medians.get)
    benchmark.extra_info.update({f"median_step_ms[{name}]": t * 1e3 for name, t in medians.items()},
                                transformers_fastest=fastest,
                                full_gpu_over_transformers_fastest=medians[RUNTIME] / medians[fastest],
                                dispatch_host_us_per_layer=runtime.dispatch.per_layer_us()["decode"])
    for impl in TRANSFORMERS_EXPERTS:
        torch.testing.assert_close(logits[RUNTIME], logits[impl], rtol=1e-4, atol=1e-5, msg=impl)
    assert runtime.dispatch.layers["decode"] > 0 and sum(row["bytes"] for row in runtime.recorder.rows) == 0


@pytest.fixture(scope="module")
def builtin_promoe():
    """The built-in model under promoe with every expert cached: nothing is copied, so a step is all
    compute and instrumentation (per layer, expert and prediction stamps), the overhead's worst case."""
    loaded = load_checkpoint(str(builtin_checkpoint()), torch.device("cpu"))
    predictors = load_predictors(BUILTIN_DIR / "promoe_predictors", model_fingerprint(loaded.config, loaded.layers))
    return loaded, {"learned": predictors}


@pytest.mark.benchmark(group="decode step: instrumentation overhead (built-in model, promoe, all cached)")
def test_decode_step_instrumentation_overhead(benchmark, builtin_promoe):
    """Timeline on and off alternate step by step in one runtime, so that the machine's drift hits both
    alike; extra_info holds each one's median step and their ratio (the overhead)."""
    loaded, predictors = builtin_promoe
    runtime = OffloadRuntime(loaded, parse("promoe"), loaded.store.num_experts, EmulatedLink(50, 0),
                             torch.device("cpu"), predictors)
    for layer in range(loaded.store.num_layers):  # everything cached before the first step: no stalls
        for expert in range(loaded.store.num_experts):
            runtime.request(layer, expert, Priority.HIGH)
    runtime.engine.idle()
    setup, step = decode_step(Forward(loaded.model, runtime))
    seconds = {True: [], False: []}

    def pair(cache):
        order = (True, False) if len(seconds[True]) % 2 else (False, True)  # neither always goes first
        for detail in order:
            runtime.recorder.detail = detail
            start = time.perf_counter()  # the whole call: the step and its bookkeeping after it
            step(cache)
            seconds[detail].append(time.perf_counter() - start)

    try:
        benchmark.pedantic(pair, setup=setup, rounds=300, warmup_rounds=10)
    finally:
        runtime.close()
    on, off = (statistics.median(seconds[detail]) for detail in (True, False))
    benchmark.extra_info.update(median_step_ms_timeline_on=on * 1e3, median_step_ms_timeline_off=off * 1e3,
                                overhead=on / off - 1)
    kinds = {row["kind"] for row in runtime.recorder.timeline}
    assert kinds - {"chunk"} == {"step", "head", "non_expert", "moe", "router", "expert", "predict", "occupancy"}
    assert len([row for row in runtime.recorder.timeline if row["kind"] == "expert"]) > 0


def expert_inputs(hidden_size: int, num_experts: int, tokens: int = 4, top_k: int = 2):
    """hidden [T, H], top_k_index [T, K] (distinct per token) and weights, seeded."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    return hidden, index, torch.rand(tokens, top_k, generator=generator).softmax(-1)


@pytest.mark.benchmark(group="one layer's experts call: offload dispatch vs transformers' eager experts")
def test_experts_call_transformers_eager(benchmark, mixtral_folder):
    model = AutoModelForCausalLM.from_pretrained(mixtral_folder, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    args = expert_inputs(model.config.hidden_size, model.config.num_local_experts)
    with torch.no_grad():
        out = benchmark.pedantic(experts, args=args, rounds=200, warmup_rounds=10)
    assert out.shape == args[0].shape


@pytest.mark.benchmark(group="one layer's experts call: offload dispatch vs transformers' eager experts")
def test_experts_call_offload_dispatch(benchmark, mixtral_folder):
    """The same call through the ExpertsInterface implementation the runtime registers, every expert cached:
    what routing an experts call through the offload runtime costs (lookups, waits, bookkeeping)."""
    loaded = load_checkpoint(str(mixtral_folder), torch.device("cpu"))
    runtime = OffloadRuntime(loaded, parse("full_gpu"), 16, EmulatedLink(50, 0), torch.device("cpu"))
    experts = loaded.layers[0].experts
    args = expert_inputs(loaded.config.hidden_size, loaded.config.num_local_experts)
    reference = AutoModelForCausalLM.from_pretrained(mixtral_folder, dtype=torch.float32).model.layers[0].mlp.experts
    runtime.begin_step(step=0, batch=0)
    try:
        with torch.no_grad():
            out = benchmark.pedantic(experts, args=args, rounds=200, warmup_rounds=10)
            expected = reference(*args)
    finally:
        runtime.close()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

"""Device memory: a strategy whose experts do not fit is skipped with its reason (full_gpu first of all), the
routing the others read comes from an offloading pass, and each strategy's memory is freed when it ends."""

import gc
import html
import json
import weakref

import pandas as pd
import pytest
import torch

from promoe_bench import bench
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.config import RunConfig, flag_workload
from promoe_bench.generation import generate
from promoe_bench.report import write_report

from .runtime_helpers import make_runtime
from .test_cli import EXPERTS, MOE_LAYERS, assert_usage_error, run_cli

PROMPT = torch.tensor([[5, 9, 3, 7, 1, 4]])


@pytest.fixture(scope="module")
def expert_bytes(checkpoints):
    return load_checkpoint(str(checkpoints["mixtral"]), torch.device("cpu")).store.layout.nbytes


def test_a_strategy_whose_experts_do_not_fit_is_skipped_and_the_rest_read_an_offloading_pass(
        checkpoints, expert_bytes, tmp_path):
    # room for half of each layer's experts: lru's cache (rate 0.5) fits, full_gpu's every expert does not
    budget = EXPERTS // 2 * MOE_LAYERS * expert_bytes
    out = tmp_path / "run"
    result = run_cli(checkpoints["mixtral"], out, "--strategy", "full_gpu,lru,static,oracle",
                     "--device-memory", budget)
    assert result.exit_code == 0, (result.output, result.exc_info)
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert skipped == [f"skipped full_gpu: its experts need {EXPERTS * MOE_LAYERS * expert_bytes / 1e9:.2f} GB on "
                       f"the device and the run has {budget / 1e9:.2f} GB for them (--device-memory "
                       f"{budget / 1e9:.2f} GB)"]
    meta = json.loads((out / "run.json").read_text())
    assert list(meta["skipped"]) == ["full_gpu"] and list(meta["strategies"]) == ["lru", "static", "oracle"]
    assert meta["trace"] == "recorded by an unreported lru pass" and meta["tokens_reference"] == "lru"
    summary = pd.read_csv(out / "summary.csv")
    assert summary["tokens_match"].all()  # offloading changes no token, so lru's routing is full_gpu's
    write_report([out], None, tmp_path / "report.html")
    assert f"full_gpu was not run: {skipped[0].removeprefix('skipped full_gpu: ')}" in html.unescape(
        (tmp_path / "report.html").read_text())
    layers = pd.read_csv(out / "layers.csv")
    assert (layers.query("strategy == 'oracle'")["misses"].sum() < layers.query("strategy == 'lru'")["misses"].sum())


def test_a_device_too_small_for_any_strategy_is_one_line(checkpoints, expert_bytes, tmp_path):
    result = run_cli(checkpoints["mixtral"], tmp_path / "run", "--strategy", "full_gpu,lru",
                     "--device-memory", expert_bytes)
    assert_usage_error(result, "no strategy fits on the device", "lower --cache-rate")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", ["full_gpu", "lru", "oracle", "static", "promoe[predictor=gate]"])
def test_a_finished_strategys_runtime_and_slot_pool_are_freed_without_a_collection(checkpoints, spec, monkeypatch):
    made = []

    class Watched(bench.OffloadRuntime):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((weakref.ref(self), weakref.ref(self.pool.buffer)))

    monkeypatch.setattr(bench, "OffloadRuntime", Watched)
    cfg = RunConfig(model=str(checkpoints["mixtral"]), strategies=spec, device="cpu", repeats=1, warmup=0,
                    workload=flag_workload(prompt_len=4, gen_len=3))
    loaded = bench.load_model(cfg, torch.device("cpu"))
    batches = bench.make_batches(cfg.workload, loaded)
    strategy = bench.resolve(spec)[0]
    trace = None
    if strategy.needs_trace:
        full = bench.record_routing(loaded, cfg, torch.device("cpu"), batches, (bench.resolve("full_gpu")[0], EXPERTS))
        trace = bench.routing_trace(full)
    gc.collect()
    gc.disable()
    try:
        made.clear()
        capacity = bench.strategy_capacity(strategy, loaded, cfg.cache_rate, None)
        result = bench.run_strategy(loaded, strategy, capacity, cfg, torch.device("cpu"), batches,
                                    bench.tqdm(disable=True), trace=trace)
        assert result.steps, "the strategy ran"
        [(runtime, pool)] = made
        assert runtime() is None, f"{spec}: its runtime is held by a reference cycle"
        assert pool() is None, f"{spec}: its slot pool outlives it"
    finally:
        gc.enable()



def test_a_layers_input_is_let_go_once_its_block_has_run(checkpoints):
    """The runtime keeps each MoE layer's input only while its block runs (its predictions are made from it):
    T x H of activations per layer would otherwise stay for the whole step."""
    loaded = load_checkpoint(str(checkpoints["mixtral"]), torch.device("cpu"))
    runtime = make_runtime(loaded, "promoe[predictor=gate]", PROMPT, 2)
    first, second = loaded.layers[0].block, loaded.layers[1].block
    seen, alive_later = [], []
    hooks = [first.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0]))),
             second.register_forward_pre_hook(lambda module, args: alive_later.append(seen[-1]() is not None))]
    try:
        generate(loaded.model, PROMPT, 2, runtime)
    finally:
        runtime.close()
        for hook in hooks:
            hook.remove()
    assert alive_later == [False, False], "layer 0's input outlived its block"

"""`promoe-bench run`: every strategy on the same prompts and seed, one run folder for all of them."""

import contextlib
import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from . import provenance, timeline
from .checkpoint import LoadedModel, load_checkpoint
from .config import DEVICE_RESERVE, RunConfig, cache_capacity
from .errors import UsageError
from .generation import generate, left_pad
from .links import CudaLink, EmulatedLink
from .meter import PhaseMeter
from .offload import OffloadRuntime
from .predictors import LearnedPredictors, load_predictors, model_fingerprint
from .quiet import collector_held, compute_threads, torch_threads
from .results import RunWriter
from .routing_log import RoutingLogBuilder
from .statistics import statistics_table
from .strategies import available, resolve
from .summary import summarize
from .trace import RoutingTrace
from .workloads import Workload, build_requests


@dataclass
class StrategyRun:
    label: str
    capacity: int
    requests: list[dict]
    steps: list[dict]
    layers: pd.DataFrame  # the recorder's rows: layers.csv
    tokens: list[torch.Tensor]  # per batch, [B, N] of the last repeat
    link: dict
    timeline: pd.DataFrame  # every timed event (promoe_bench/timeline.py); empty when not detailed
    phases: list[dict]  # the meter's row per (repeat, batch, phase)
    samples: pd.DataFrame  # the meter's samples, `t_s` on the timeline's clock
    unmeasured: dict[str, str]  # metric -> why this machine could not measure it
    dispatch_host_us: dict[str, float] | None  # phase -> per MoE layer on the hit path (offload.DispatchTime)


@dataclass(frozen=True)
class Batch:
    requests: list[int]  # request numbers
    prompts: list[list[int]]  # their token ids
    input_ids: torch.Tensor  # [B, P] left-padded
    attention_mask: torch.Tensor  # [B, P]


def make_batches(workload: Workload, loaded: LoadedModel) -> list[Batch]:
    """The workload's requests, in order, cut into batches: the same for every strategy of a run."""
    tokenize = loaded.tokenize if loaded.tokenizer is not None else None
    prompts = build_requests(workload, tokenize, loaded.config.vocab_size)
    batches = []
    for start in range(0, len(prompts), workload.batch_size):
        chunk = prompts[start : start + workload.batch_size]
        ids, mask = left_pad(chunk, loaded.pad_id)
        batches.append(Batch(list(range(start, start + len(chunk))), chunk, ids, mask))
    return batches


def strategy_capacity(strategy, loaded: LoadedModel, cache_rate: float, gpu_memory: int | None) -> int:
    """Cache slots per layer for `strategy`: its own cache_rate / gpu_memory over the run's, then its say."""
    store = loaded.store
    budget = cache_capacity(store.num_experts, loaded.top_k, store.num_layers, store.layout.nbytes,
                            cache_rate if strategy.cache_rate is None else strategy.cache_rate,
                            gpu_memory if strategy.gpu_memory is None else strategy.gpu_memory)
    return strategy.capacity(store.num_experts, budget)


def make_link(cfg: RunConfig, device: torch.device):
    if device.type == "cuda":
        return CudaLink(device)
    return EmulatedLink(cfg.link_gbps, cfg.link_latency_us)


def batch_rows(context: dict, prompts: dict, step_seconds: list[float], prefill_tokens: int):
    """The requests and steps rows of one batch's generation (`prompts`: request -> its prompt tokens; the
    batch's requests share its TTFT and TPOT)."""
    ttft, decode = step_seconds[0], step_seconds[1:]
    tpot = sum(decode) / len(decode) if decode else float("nan")
    requests = [{**context, "request": request, "prompt_tokens": tokens, "output_tokens": len(step_seconds),
                 "ttft_s": ttft, "tpot_s": tpot, "prefill_tok_s": tokens / ttft, "decode_tok_s": 1 / tpot}
                for request, tokens in prompts.items()]
    steps = [{**context, "phase": "prefill" if step == 0 else "decode", "step": step,
              "tokens": prefill_tokens if step == 0 else len(prompts), "seconds": seconds}
             for step, seconds in enumerate(step_seconds)]
    return requests, steps


def run_strategy(loaded: LoadedModel, strategy, capacity: int, cfg: RunConfig, device, batches: list[Batch],
                 progress, predictors: dict | None = None, trace: RoutingTrace | None = None,
                 detail: bool = True, routing_log: RoutingLogBuilder | None = None) -> StrategyRun:
    link = make_link(cfg, device)
    runtime = OffloadRuntime(loaded, strategy, capacity, link, device, predictors, trace, detail, routing_log)
    meter = PhaseMeter(device, link)
    meter.start()
    gen_len = cfg.workload.output_tokens
    requests, steps, tokens, phases = [], [], [], []
    try:
        with torch_threads(compute_threads(device)), on_device(device):
            for repeat in range(cfg.warmup + cfg.repeats):  # warm-up repeats first, recorded but flagged
                tokens = []
                for number, batch in enumerate(batches):
                    context = {"strategy": strategy.label, "repeat": repeat, "warmup": repeat < cfg.warmup,
                               "batch": number}
                    with collector_held():  # collected between batches instead
                        result = generate(loaded.model, batch.input_ids.to(device), gen_len, runtime,
                                          attention_mask=batch.attention_mask, meter=meter, **context)
                    tokens.append(result.tokens)
                    phases += [{**context, **row} for row in result.phases]
                    prompts = {request: len(prompt)
                               for request, prompt in zip(batch.requests, batch.prompts, strict=True)}
                    own_requests, own_steps = batch_rows(context, prompts, result.step_seconds,
                                                         sum(prompts.values()))
                    requests += own_requests
                    steps += own_steps
                    progress.update(1)
    finally:
        meter.close()
        runtime.close()
    clock = runtime.recorder.clock
    unmeasured = dict(meter.missing)
    if not runtime.dispatch.layers:
        unmeasured["dispatch_host_us_per_layer"] = "no layer had every routed expert resident (the hit path)"
    samples = pd.DataFrame(meter.samples)
    samples.insert(0, "strategy", strategy.label)
    samples.insert(1, "t_s", samples.pop("t") - clock.host_origin_ns * 1e-9)
    return StrategyRun(strategy.label, capacity, requests, steps, runtime.recorder.rows_frame(), tokens,
                       {**link.describe(), "achieved_gbps": link.counters.achieved_gbps},
                       timeline.frame(runtime.recorder.timeline), phases, samples, unmeasured,
                       runtime.dispatch.per_layer_us())


def routing_trace(strategy_run: StrategyRun) -> RoutingTrace:
    """The routing of one repeat of a run (greedy decoding routes every repeat alike)."""
    layers = strategy_run.layers
    return RoutingTrace.from_layer_rows(layers[layers["repeat"] == layers["repeat"].max()])


def on_device(device: torch.device):
    """The run's GPU made current, for whatever does not name one (a cuda:1 run must not touch cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def device_budget(cfg: RunConfig, device: torch.device) -> tuple[int | None, str]:
    """Bytes the experts of one strategy may take on the device (None: no limit), and where that comes from:
    --device-memory, else on CUDA what is free once the model's other weights are there, less a reserve."""
    if cfg.device_memory is not None:
        return cfg.device_memory, f"--device-memory {cfg.device_memory / 1e9:.2f} GB"
    if device.type != "cuda":
        return None, "no limit on the CPU"
    free, total = torch.cuda.mem_get_info(device)
    reserve = int(total * DEVICE_RESERVE)
    return free - reserve, (f"{free / 1e9:.2f} GB free on {device} less {reserve / 1e9:.2f} GB kept for "
                            f"activations and the KV cache")


def fits(capacity: int, store, budget: tuple[int | None, str]) -> bool:
    """`capacity` slots per layer of experts fit in the device budget."""
    return budget[0] is None or capacity * store.num_layers * store.layout.nbytes <= budget[0]


def fitting(strategies: list, capacities: list[int], store, budget: tuple[int | None, str]):
    """The strategies whose experts fit on the device, their capacities, and label -> why for the rest;
    a UsageError when none fits."""
    skipped = {}
    for strategy, capacity in zip(strategies, capacities, strict=True):
        if not fits(capacity, store, budget):
            need = capacity * store.num_layers * store.layout.nbytes
            skipped[strategy.label] = (f"its experts need {need / 1e9:.2f} GB on the device and the run has "
                                       f"{max(budget[0], 0) / 1e9:.2f} GB for them ({budget[1]})")
    if len(skipped) == len(strategies):
        raise UsageError(f"no strategy fits on the device: {next(iter(skipped.values()))}; "
                         "lower --cache-rate or --gpu-memory")
    kept = [(s, c) for s, c in zip(strategies, capacities, strict=True) if s.label not in skipped]
    return [s for s, _ in kept], [c for _, c in kept], skipped


def record_routing(loaded: LoadedModel, cfg: RunConfig, device, batches: list[Batch], routing: tuple,
                   predictors: dict | None = None, routing_log: RoutingLogBuilder | None = None) -> StrategyRun:
    """A pass over the workload, unreported, under `routing` (a strategy and its cache slots per layer), for
    strategies that read the routing (and, given a builder, to record the routing log with `predictors`'
    guesses). Any strategy routes alike: offloading never changes a token's hidden states."""
    quiet = tqdm(disable=True)
    once = dataclasses.replace(cfg, warmup=0, repeats=1)
    strategy, capacity = routing
    return run_strategy(loaded, strategy, capacity, once, device, batches, quiet, predictors, detail=False,
                        routing_log=routing_log)


def routing_log_builder(cfg: RunConfig, loaded: LoadedModel, batches: list[Batch]) -> RoutingLogBuilder:
    store = loaded.store
    meta = {"model": {"name": cfg.model, "family": loaded.config.model_type},
            "workload": cfg.to_json()["workload"],
            "batches": {str(n): batch.requests for n, batch in enumerate(batches)},
            "prompt_tokens": {str(r): len(p) for batch in batches for r, p in zip(batch.requests, batch.prompts,
                                                                                     strict=True)}}
    return RoutingLogBuilder(store.num_layers, store.num_experts, loaded.top_k, meta)


def predictors_folder(cfg: RunConfig, loaded: LoadedModel) -> Path:
    """--predictors, or the model's own folder of them (the built-in model ships its own)."""
    return cfg.predictors or Path(loaded.path) / "promoe_predictors"


def learned_predictors(cfg: RunConfig, loaded: LoadedModel, strategies) -> LearnedPredictors | None:
    """The learned predictors, when a strategy predicts with them; every (source, target) pair the
    strategies will ask for must have been trained."""
    users = [s for s in strategies if "learned" in s.predictors]
    if not users:
        return None
    folder = predictors_folder(cfg, loaded)
    if not folder.exists():
        raise UsageError(
            f"{users[0].label} predicts with learned predictors and {cfg.model} has none (looked in {folder}): "
            f"train them with `promoe-bench train-predictor --model {cfg.model} --workload WORKLOAD --out {folder}`"
            f", or run {users[0].name}[predictor=gate]")
    predictors = load_predictors(folder, model_fingerprint(loaded.config, loaded.layers))
    num_layers = loaded.store.num_layers
    for strategy in users:
        needed = [(source, target - source) for source in range(num_layers)
                  for target in strategy.targets(source, num_layers)]
        missing = [pair for pair in needed if pair not in predictors.mlps]
        if missing:
            source, distance = missing[0]
            raise UsageError(f"{strategy.label} needs a predictor from layer {source} to layer {source + distance}, "
                             f"which {folder} lacks (trained distances: {predictors.distances}); retrain with "
                             f"`--distance 1..{max(d for _, d in needed)}`")
    return predictors.to(cfg.torch_device())


def own_predictors(cfg: RunConfig, loaded: LoadedModel) -> dict:
    """The model's learned predictors when it has some that fit it (for a routing log), else none."""
    folder = predictors_folder(cfg, loaded)
    try:
        predictors = load_predictors(folder, model_fingerprint(loaded.config, loaded.layers))
    except UsageError:
        return {}
    return {"learned": predictors.to(cfg.torch_device())}


def load_model(cfg: RunConfig, device: torch.device) -> LoadedModel:
    return load_checkpoint(cfg.model, device, cfg.dtype)


def run(cfg: RunConfig) -> tuple[pd.DataFrame, Path]:
    device = cfg.torch_device()
    strategies = resolve(cfg.strategies)  # unknown names fail before anything is loaded or written
    # full_gpu first: its routing is the trace that oracle and static read
    strategies.sort(key=lambda s: s.label != "full_gpu")
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise UsageError(f"a strategy is listed twice: {', '.join(labels)}")
    if cfg.baseline not in labels and cfg.baseline not in available():
        raise UsageError(f"--baseline {cfg.baseline!r} is not a strategy; run `promoe-bench strategies`")
    loaded = load_model(cfg, device)
    store = loaded.store
    capacities = [strategy_capacity(strategy, loaded, cfg.cache_rate, cfg.gpu_memory) for strategy in strategies]
    budget = device_budget(cfg, device)
    strategies, capacities, skipped = fitting(strategies, capacities, store, budget)
    # the routing that static and oracle read: full_gpu's, or, when its experts do not fit, an lru pass's
    routing = ((resolve("full_gpu")[0], store.num_experts) if fits(store.num_experts, store, budget) else
               (resolve("lru")[0], cache_capacity(store.num_experts, loaded.top_k, store.num_layers,
                                                  store.layout.nbytes, cfg.cache_rate, cfg.gpu_memory)))
    learned = learned_predictors(cfg, loaded, strategies)
    batches = make_batches(cfg.workload, loaded)  # the last input check: nothing is written before it
    writer = RunWriter(cfg.out, cfg.overwrite)
    meta = {
        "status": "running",
        "started": datetime.datetime.now(datetime.UTC).isoformat(),
        "config": cfg.to_json(),
        "environment": {**provenance.capture(device), "compute_threads": compute_threads(device)},
        "model": _model_info(loaded),
        "strategies": {},
        "skipped": skipped,  # label -> why it did not run here
    }
    runs: list[StrategyRun] = []
    progress = tqdm(total=len(strategies) * (cfg.warmup + cfg.repeats) * len(batches), desc="batches",
                    unit="batch", disable=None, leave=False)
    trace, reference = None, None  # the routing, and (label, tokens) the others' tokens are held against
    predictors = {"learned": learned} if learned is not None else {}
    try:
        if cfg.record_trace is not None:
            progress.set_postfix_str("recording the routing log")
            builder = routing_log_builder(cfg, loaded, batches)
            recorded = record_routing(loaded, cfg, device, batches, routing, predictors or own_predictors(cfg, loaded),
                                      builder)
            trace, reference = routing_trace(recorded), (routing[0].label, recorded.tokens)
            meta["trace"] = f"recorded by an unreported {routing[0].label} pass"
            builder.build().save(cfg.record_trace)
            meta["routing_log"] = str(cfg.record_trace)
        for strategy, capacity in zip(strategies, capacities, strict=True):
            progress.set_postfix_str(strategy.label)
            if strategy.needs_trace and trace is None:
                progress.set_postfix_str("recording routing")
                recorded = record_routing(loaded, cfg, device, batches, routing)
                trace, reference = routing_trace(recorded), (routing[0].label, recorded.tokens)
                meta["trace"] = f"recorded by an unreported {routing[0].label} pass"
            runs.append(run_strategy(loaded, strategy, capacity, cfg, device, batches, progress, predictors,
                                     trace if strategy.needs_trace else None))
            if strategy.label == "full_gpu":
                trace, reference = routing_trace(runs[-1]), ("full_gpu", runs[-1].tokens)
                meta["trace"] = "recorded by the full_gpu run"
            meta["strategies"][strategy.label] = {"cache_slots_per_layer": capacity,
                                                  "cache_bytes": capacity * store.num_layers * store.layout.nbytes,
                                                  "link": runs[-1].link, "unmeasured": runs[-1].unmeasured,
                                                  "dispatch_host_us_per_layer": runs[-1].dispatch_host_us}
            writer.timeline(len(runs) - 1, runs[-1].timeline)
            runs[-1].timeline = None  # on disk now; a run's timelines together can take gigabytes
            if device.type == "cuda":  # the strategy's slot pool is gone: the next one's peaks are its own
                with on_device(device):
                    torch.cuda.empty_cache()
            reference = reference or (runs[0].label, runs[0].tokens)
            meta["tokens_reference"] = reference[0]
            summary = _write_tables(writer, runs, cfg, reference[1])
            writer.metadata(meta)
        meta["status"] = "complete"
    except BaseException as error:  # Ctrl-C included: keep what finished, say it is incomplete
        meta["status"] = "incomplete"
        meta["reason"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        progress.close()
        meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat()
        writer.metadata(meta)
        out = writer.publish()
    return summary, out


def _model_info(loaded: LoadedModel) -> dict:
    store, report = loaded.store, loaded.report
    # pinned_bytes against expert_store_bytes shows what pinning costs the host (torch's pinned allocator
    # once took 1.5x); on the CPU nothing is pinned, and a 0 would read as a measurement
    unmeasured = {} if store.pinned else {"pinned_bytes": "not pinned: copies go to the emulated link on the CPU"}
    return {
        "path": str(loaded.path), "family": loaded.config.model_type, "moe_layers": store.num_layers,
        "experts_per_layer": store.num_experts, "top_k": loaded.top_k, "expert_bytes": store.layout.nbytes,
        "dtype": str(store.layout.dtype).removeprefix("torch."), "tokenizer": loaded.tokenizer is not None,
        "checkpoint_bytes": report.checkpoint_bytes, "expert_store_bytes": store.nbytes,
        "pinned_bytes": store.pinned_bytes if store.pinned else None, "unmeasured": unmeasured,
        "load_seconds": report.seconds, "load_peak_rss_over_checkpoint": report.peak_over_checkpoint,
    }


def _write_tables(writer: RunWriter, runs: list[StrategyRun], cfg: RunConfig, reference) -> pd.DataFrame:
    """`reference`: the tokens every strategy's are held against (run.json's tokens_reference says whose)."""
    matches = {run.label: all(map(torch.equal, run.tokens, reference)) for run in runs}
    return write_tables(writer, runs, cfg.baseline, matches)


def write_tables(writer: RunWriter, runs: list[StrategyRun], baseline: str | dict, matches: dict) -> pd.DataFrame:
    """Every table of a run folder from the strategies run so far; the summary. `matches`: label ->
    whether its tokens are full_gpu's (None where no tokens were made, in a simulation); `baseline`: a
    label, or each label's own."""
    requests = pd.DataFrame([row for run in runs for row in run.requests])
    steps = pd.DataFrame([row for run in runs for row in run.steps])
    layers = pd.concat([run.layers for run in runs], ignore_index=True)
    phases = pd.DataFrame([row for run in runs for row in run.phases])
    samples = pd.concat([run.samples for run in runs], ignore_index=True)
    summary = summarize(requests, steps, layers, baseline, matches, phases)
    tables = {"requests": requests, "steps": steps, "layers": layers, "phases": phases, "samples": samples,
              "statistics": statistics_table(requests), "summary": summary}
    for name, frame in tables.items():
        if not frame.empty:  # a simulation measures no phases nor samples
            writer.table(name, frame)
    return summary

"""`promoe-bench simulate`: a routing log replayed under every strategy on modelled hardware, written as a
run folder in the runtime's schema (marked simulated, with the profiles and log it used), so `trace`,
`report` and `compare` read it like a real run.

Costs come from a hardware and a model profile (a projection), or from a real run's measurements
(`--measured RUN`, to check the simulator against that run). A log projects onto a model profile only
when their experts and top-k match; layers may differ through an explicit `--layer-map`, which the
results then name.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import provenance, timeline
from .bench import StrategyRun, batch_rows, write_tables
from .config import cache_capacity
from .costs import CostModel, MeasuredCosts, ProfileCosts
from .errors import UsageError
from .profiles import load_hardware, load_model_profile
from .quiet import collector_held
from .results import RunWriter, load_run
from .routing_log import RoutingLog, RoutingLogBuilder
from .simulator import Simulation
from .strategies import resolve

LAYER_MAPS = ("cycle", "truncate")


@dataclass(frozen=True)
class SimConfig:
    trace: Path
    hardware: str | None = None
    model_profile: str | None = None
    precision: str = "fp16"
    measured: Path | None = None  # a run folder whose measured compute and link replace the profiles
    compute_of: str | None = None  # with measured: every strategy replays this strategy's measured compute
    strategies: str = "all"
    cache_rates: tuple[float, ...] = (0.5,)
    repeats: int = 1
    warmup: int = 1
    baseline: str = "lru"
    layer_map: str | None = None
    detail: bool = True  # keep the timeline (a long log replays faster without it)
    out: Path = Path("runs/simulated")
    overwrite: bool = False

    def __post_init__(self):
        if (self.measured is None) == (self.hardware is None or self.model_profile is None):
            if self.measured is None:
                raise UsageError("simulate needs --hardware and --model-profile, or --measured RUN")
            raise UsageError("--measured replaces --hardware and --model-profile: give one or the other")
        if self.compute_of is not None and self.measured is None:
            raise UsageError("--compute-of borrows a measured strategy's compute: it needs --measured RUN")
        if not self.cache_rates or any(not 0 < r <= 1 for r in self.cache_rates):
            raise UsageError(f"--cache-rate must be in (0, 1], got {list(self.cache_rates)}")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError("--repeats must be at least 1 and --warmup at least 0")
        if self.layer_map not in (None, *LAYER_MAPS):
            raise UsageError(f"--layer-map must be one of {', '.join(LAYER_MAPS)}, got {self.layer_map!r}")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def map_layers(log: RoutingLog, layers: int, how: str) -> RoutingLog:
    """The log on a model of `layers` MoE layers: `truncate` keeps the first ones, `cycle` gives layer l the
    routing of layer l mod the log's layers. Predictions do not survive (they guess a layer's neighbours)."""
    if how == "truncate" and layers > log.num_layers:
        raise UsageError(f"--layer-map truncate cannot make {layers} layers from a log of {log.num_layers}")
    meta = {**log.meta, "layer_map": {"how": how, "from_layers": log.num_layers, "to_layers": layers}}
    meta.pop("predictors", None)
    builder = RoutingLogBuilder(layers, log.num_experts, log.top_k, meta)
    for f in range(len(log.counts)):
        builder.add_forward(log.forward_batch[f], log.forward_step[f])
        for layer in range(layers):
            rows = log.rows(f, layer % log.num_layers)
            builder.add_layer(layer, log.experts[rows], log.weights[rows])
    return builder.build()


def _fit_log(log: RoutingLog, cfg: SimConfig, model) -> RoutingLog:
    if (log.num_experts, log.top_k) != (model.experts, model.top_k):
        raise UsageError(f"{cfg.trace} routes {log.num_experts} experts top-{log.top_k}, the model profile "
                         f"{model.name} has {model.experts} top-{model.top_k}: a projection needs both to match")
    if log.num_layers == model.moe_layers:
        return log
    if cfg.layer_map is None:
        raise UsageError(f"{cfg.trace} has {log.num_layers} MoE layers, {model.name} {model.moe_layers}: "
                         f"choose --layer-map cycle or truncate")
    return map_layers(log, model.moe_layers, cfg.layer_map)


def _available(strategy, log: RoutingLog):
    """The strategy as the log allows: a predictor whose guesses the log lacks becomes `noisy` (named in
    the label), which draws guesses from the recorded future at the strategy's `recall`."""
    missing = [name for name in strategy.predictors if name not in ("oracle", "noisy")
               and any((name, target - source) not in log.predictions
                       for source in range(log.num_layers) for target in strategy.targets(source, log.num_layers))]
    return dataclasses.replace(strategy, predictor="noisy") if missing else strategy


def _baselines(runs, baseline: str, per_rate: bool) -> str | dict[str, str]:
    """Each strategy's baseline: `baseline`, or with several cache rates the baseline at the same rate."""
    if not per_rate:
        return baseline
    labels = {s.label for s in runs}
    base = resolve(baseline)[0]
    return {s.label: (label if (label := dataclasses.replace(base, cache_rate=s.cache_rate).label) in labels
                      else baseline) for s in runs}


def _requests(log: RoutingLog) -> dict[int, list]:
    batches = log.meta.get("batches") or {}
    return {int(b): batches.get(str(int(b)), [f"batch-{int(b)}"]) for b in dict.fromkeys(log.forward_batch)}


def simulate_strategy(log: RoutingLog, strategy, capacity: int, costs, chunk_bytes, cfg: SimConfig) -> StrategyRun:
    sim = Simulation(log, strategy, capacity, costs, chunk_bytes, cfg.detail)
    requests_of = _requests(log)
    prompt_tokens = log.meta.get("prompt_tokens") or {}
    requests, steps = [], []
    for repeat in range(cfg.warmup + cfg.repeats):
        seconds: dict[int, list[float]] = {}
        with collector_held():  # the replay makes no garbage cycles; collections would rescan its rows
            for f, (batch, step) in enumerate(zip(log.forward_batch.tolist(), log.forward_step.tolist(), strict=True)):
                context = {"strategy": strategy.label, "repeat": repeat, "warmup": repeat < cfg.warmup, "batch": batch}
                spent = sim.forward(f, **context, phase="prefill" if step == 0 else "decode", step=step)
                seconds.setdefault(batch, []).append(spent)
        for batch, spent in seconds.items():
            members = requests_of[batch]
            rows = int(log.counts[log.forward_batch == batch][0].max())  # the prefill's token rows
            prompts = {request: prompt_tokens.get(str(request), rows / len(members)) for request in members}
            context = {"strategy": strategy.label, "repeat": repeat, "warmup": repeat < cfg.warmup, "batch": batch}
            own_requests, own_steps = batch_rows(context, prompts, spent, rows)
            requests += own_requests
            steps += own_steps
    link = {"kind": "simulated", "costs": costs.describe(), "bytes": sim.link.bytes}
    return StrategyRun(strategy.label, capacity, requests, steps, sim.recorder.rows_frame(), None, link,
                       timeline.frame(sim.recorder.timeline), [], pd.DataFrame(),
                       {"hardware counters": "a simulation measures nothing"}, None)


def simulate(cfg: SimConfig) -> tuple[pd.DataFrame, Path, list[str]]:
    """The summary, the run folder, and notes for the user (what the results stand on)."""
    log = RoutingLog.load(cfg.trace)
    asked = resolve(cfg.strategies)
    strategies = [_available(s, log) for s in asked]
    notes = [f"note: {cfg.trace} holds no {', '.join(sorted(a.predictors))} guesses: {a.label} runs as {s.label}"
             for a, s in zip(asked, strategies, strict=True) if a is not s]
    if cfg.measured is not None:
        run_meta, _ = load_run(cfg.measured)
        model = run_meta["model"]
        shape = (model.get("moe_layers"), model.get("experts_per_layer"), model.get("top_k"))
        if shape != (log.num_layers, log.num_experts, log.top_k):
            raise UsageError(f"{cfg.trace} routes {log.num_layers} layers of {log.num_experts} experts top-"
                             f"{log.top_k}; {cfg.measured} ran {shape[0]} of {shape[1]} top-{shape[2]}: replay a "
                             f"run's own log (`run --record-trace`) with --measured")
        expert_bytes = model["expert_bytes"]
        measured_slots = {label: info["cache_slots_per_layer"] for label, info in run_meta["strategies"].items()}

        borrowed = MeasuredCosts(cfg.measured, cfg.compute_of, log) if cfg.compute_of else None

        def costs_for(strategy):  # each strategy replays its own measurements, with its own cache
            own = MeasuredCosts(cfg.measured, strategy.label, log)
            return own.with_compute_of(borrowed) if borrowed else own

        model_info = {**run_meta["model"], "from_run": str(cfg.measured)}
    else:
        hardware, model = load_hardware(cfg.hardware), load_model_profile(cfg.model_profile)
        log = _fit_log(log, cfg, model)
        cost_model = CostModel(hardware, model, cfg.precision)
        expert_bytes = cost_model.expert_bytes
        shared = ProfileCosts(cost_model, log)
        measured_slots = {}

        def costs_for(strategy):
            return shared

        model_info = {"profile": model.name, "family": model.family, "moe_layers": model.moe_layers,
                      "experts_per_layer": model.experts, "top_k": model.top_k, "expert_bytes": expert_bytes,
                      "precision": cfg.precision}
    third = expert_bytes // 3
    chunk_bytes = (third, third, expert_bytes - 2 * third)  # gate, up, down: equal matrices
    runs = [s for s in strategies if s.name == "full_gpu"] + [s for s in strategies if s.name != "full_gpu"]
    if len(cfg.cache_rates) > 1:  # one strategy per rate, named by it
        runs = [s if s.name == "full_gpu" or s.cache_rate is not None else dataclasses.replace(s, cache_rate=r)
                for r in cfg.cache_rates for s in runs]
        runs = list({s.label: s for s in runs}.values())
    baseline = _baselines(runs, cfg.baseline, len(cfg.cache_rates) > 1)
    capacities = [measured_slots.get(s.label) or s.capacity(log.num_experts, cache_capacity(
        log.num_experts, log.top_k, log.num_layers, expert_bytes, s.cache_rate or cfg.cache_rates[0], None))
        for s in runs]
    costs = [costs_for(strategy) for strategy in runs]  # every input is checked before anything is written
    writer = RunWriter(cfg.out, cfg.overwrite)
    source = log.meta.get("source")
    notes.insert(0, f"simulated: {source} routing from {cfg.trace}" + (
        f" (SYNTHETIC: {log.meta.get('synthetic')})" if source == "synthetic" else "") + ", costs from " + (
        f"{cfg.hardware} and {cfg.model_profile} ({cfg.precision})" if cfg.measured is None else str(cfg.measured)) + (
        f", every strategy on {cfg.compute_of}'s measured compute" if cfg.compute_of else ""))
    if log.meta.get("layer_map"):
        notes.insert(1, f"layers mapped: {log.meta['layer_map']}")
    # no wall-clock times in a simulated run: the same inputs give the same bytes
    meta = {"status": "running",
            "simulated": {"trace": str(cfg.trace), "source": log.meta.get("source"),
                          "trace_sha256": log.digest(),
                          "synthetic": log.meta.get("synthetic"), "imported": log.meta.get("imported", {}).get("file"),
                          "gaps": log.gaps(), "layer_map": log.meta.get("layer_map")},
            "config": cfg.to_json(), "environment": provenance.capture(torch.device("cpu")), "model": model_info,
            "strategies": {}}
    done: list[StrategyRun] = []
    try:
        for strategy, capacity, cost in zip(runs, capacities, costs, strict=True):
            done.append(simulate_strategy(log, strategy, capacity, cost, chunk_bytes, cfg))
            writer.timeline(len(done) - 1, done[-1].timeline)
            done[-1].timeline = None
            meta["strategies"][strategy.label] = {"cache_slots_per_layer": capacity,
                                                  "cache_bytes": capacity * log.num_layers * expert_bytes,
                                                  "link": done[-1].link, "unmeasured": done[-1].unmeasured}
            summary = write_tables(writer, done, baseline, {run.label: None for run in done})
            writer.metadata(meta)
        meta["status"] = "complete"
    except BaseException as error:
        meta["status"] = "incomplete"
        meta["reason"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        writer.metadata(meta)
        out = writer.publish()
    return summary, out, notes

"""The `promoe-bench` command. Options become a frozen RunConfig here and nowhere else."""

import sys
from pathlib import Path

import click

from .config import DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US, RunConfig
from .errors import UsageError


class _Group(click.Group):
    """Turns a user's mistake (UsageError) into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            click.echo(f"promoe-bench: error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="promoe-bench")
def main():
    """Benchmark Mixture-of-Experts expert-offloading strategies on real checkpoints."""


@main.command()
@click.option("--model", default="builtin", show_default=True, help="Checkpoint folder, hub id, or 'builtin'.")
@click.option("--strategy", "strategies", default="all", show_default=True,
              help="'all', or NAME[param=value,...] separated by commas, e.g. lru[cache_rate=0.25],on_demand.")
@click.option("--cache-rate", type=float, default=0.5, show_default=True,
              help="Fraction of each layer's experts cached.")
@click.option("--gpu-memory", type=int, default=None, help="Byte budget for the expert cache (overrides --cache-rate).")
@click.option("--device-memory", type=int, default=None,
              help="Bytes the experts may take on the device; a strategy needing more (full_gpu: every expert) is "
              "skipped, with its reason. Default: on CUDA what is free after loading, less 10%; on the CPU no limit.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", default="auto", show_default=True, help="auto (the checkpoint's), float32, bfloat16, float16.")
@click.option("--link-gbps", type=float, default=DEFAULT_LINK_GBPS, show_default=True,
              help="Emulated host-to-device bandwidth (--device cpu only).")
@click.option("--link-latency-us", type=float, default=DEFAULT_LINK_LATENCY_US, show_default=True,
              help="Emulated per-copy latency (--device cpu only).")
@click.option("--workload", default=None, help="A shipped workload (see `promoe-bench workloads`) or a TOML file; "
              "without it, random prompts sized by --prompt-len.")
@click.option("--workload-file", type=click.Path(path_type=Path), default=None,
              help="The data file of a file-based workload (e.g. your ShareGPT JSON for --workload sharegpt).")
@click.option("--prompt-len", type=int, default=None,
              help="Prompt tokens (random prompts: 64); caps a text workload's prompts.")
@click.option("--gen-len", type=int, default=None, help="Output tokens per request (random prompts: 32).")
@click.option("--batch-size", type=int, default=None, help="Requests per batch (random prompts: 1).")
@click.option("--num-requests", type=int, default=None, help="Requests per repeat (random prompts: one batch).")
@click.option("--seed", type=int, default=None, help="Prompt seed (random prompts: 0).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Measured repeats.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Warm-up repeats, recorded and excluded.")
@click.option("--baseline", default="lru", show_default=True, help="Strategy the speedups are measured against.")
@click.option("--predictors", type=click.Path(path_type=Path), default=None,
              help="Folder of learned predictors (from train-predictor); default: the model's own.")
@click.option("--record-trace", type=click.Path(path_type=Path), default=None,
              help="Also write the workload's routing log (routing and every predictor's guesses) to this file, "
              "for `promoe-bench simulate`.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also write the HTML report of this run to this file (as `promoe-bench report` does).")
def run(**options):
    """Run strategies on one model and workload; print a comparison and write a run folder."""
    from .bench import run as run_benchmark  # torch and transformers load only for commands that need them
    from .results import load_run
    from .statistics import variability_warnings
    from .summary import format_table

    report = options.pop("report")
    if report is not None and report.is_dir():  # refused before the run, not after it
        raise UsageError(f"--report {report} is a folder; give a file name such as report.html")
    workload = _workload(**{k: options.pop(k) for k in ("workload", "workload_file", "prompt_len", "gen_len",
                                                        "batch_size", "num_requests", "seed")})
    cfg = RunConfig(workload=workload, **options)
    summary, out = run_benchmark(cfg)
    if cfg.torch_device().type == "cpu":
        click.echo(f"device: cpu, emulated host-to-device link at {cfg.link_gbps} GB/s + "
                   f"{cfg.link_latency_us} us per copy (timings are emulated, not PCIe)")
    meta, tables = load_run(out)
    click.echo(format_table(summary, cfg.baseline))
    for label, why in meta.get("skipped", {}).items():
        click.echo(f"skipped {label}: {why}")
    if cfg.baseline not in set(summary["strategy"]):
        click.echo(f"note: no speedups: the baseline {cfg.baseline} was not among the strategies run", err=True)
    if not summary["tokens_match"].all():
        click.echo(f"warning: some strategies produced different tokens than {meta['tokens_reference']} "
                   "(see summary.csv)", err=True)
    warnings, note = variability_warnings(tables["statistics"], tables["requests"])
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out}")
    if report is not None:
        from .report import write_report

        click.echo(f"wrote {report} ({write_report([out], None, report) / 1e6:.1f} MB)")


def _workload(workload, workload_file, prompt_len, gen_len, batch_size, num_requests, seed):
    """The run's workload: a named or file workload with the flags given on top, or random prompts."""
    from .config import flag_workload
    from .workloads import load_workload

    for flag, value, low in (("--prompt-len", prompt_len, 1), ("--gen-len", gen_len, 1),
                             ("--batch-size", batch_size, 1), ("--num-requests", num_requests, 1), ("--seed", seed, 0)):
        if value is not None and value < low:  # named by its flag here, rather than by the workload field
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if workload is None:
        if workload_file is not None:
            raise UsageError("--workload-file needs --workload (e.g. --workload sharegpt --workload-file data.json)")
        return flag_workload(prompt_len, gen_len, batch_size, num_requests, seed)
    chosen = load_workload(workload)
    lengths = {}
    if prompt_len is not None:  # exact for random prompts, a cap for text
        low = prompt_len if chosen.source == "synthetic" else min(chosen.min_prompt_tokens, prompt_len)
        lengths = {"min_prompt_tokens": low, "max_prompt_tokens": prompt_len}
    chosen = chosen.with_overrides(output_tokens=gen_len, batch_size=batch_size, num_requests=num_requests,
                                   seed=seed, **lengths)
    return chosen.with_path(workload_file) if workload_file is not None else chosen


@main.command()
def workloads():
    """List the shipped workloads."""
    from .workloads import shipped_workloads

    for name, w in shipped_workloads().items():
        click.echo(f"{name:<13} {w.source:<9} {w.num_requests:>3} requests, prompts {w.min_prompt_tokens}-"
                   f"{w.max_prompt_tokens} tokens, {w.output_tokens} out, batch {w.batch_size}: {w.description}")


@main.command("routing-stats")
@click.option("--model", default="builtin", show_default=True, help="Checkpoint folder, hub id, or 'builtin'.")
@click.option("--workload", default="chat", show_default=True)
@click.option("--num-requests", type=int, default=None, help="Override the workload's request count.")
@click.option("--gen-len", type=int, default=None, help="Override the workload's output tokens.")
@click.option("--compare-random", is_flag=True, help="Also measure a randomly initialised model of the same shape.")
def routing_stats(model, workload, num_requests, gen_len, compare_random):
    """Per-layer routing structure: expert usage, token-to-token reuse, next-layer-gate recall, LRU hits."""
    from .routing_stats import markdown_table, routing_report
    from .workloads import load_workload

    chosen = load_workload(workload).with_overrides(num_requests=num_requests, output_tokens=gen_len)
    click.echo(markdown_table(routing_report(model, chosen, compare_random)))


@main.command("train-predictor")
@click.option("--model", default="builtin", show_default=True, help="Checkpoint folder, hub id, or 'builtin'.")
@click.option("--workload", default="chat", show_default=True, help="Whose prompts' routing to learn.")
@click.option("--num-requests", type=int, default=None, help="Override the workload's request count.")
@click.option("--gen-len", type=int, default=None, help="Override the workload's output tokens.")
@click.option("--exclude-workload", multiple=True,
              help="Leave out the prompts this workload uses (keep benchmark prompts out of training).")
@click.option("--distance", default="1..3", show_default=True, help="Layers ahead: N, A..B or A,B.")
@click.option("--width", type=int, default=None, help="MLP hidden width [default: min(1024, 2 x hidden size)].")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and initialisation seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the predictors.")
@click.option("--overwrite", is_flag=True, help="Replace predictors already in --out.")
def train_predictor(model, workload, num_requests, gen_len, exclude_workload, distance, width, seed, device, out,
                    overwrite):
    """Train ProMoE's learned predictors (layer l's input -> layer l+d's experts) on a workload."""
    from .checkpoint import resolve_checkpoint
    from .predictor_training import parse_distances, train_predictors
    from .predictors import METADATA, WEIGHTS
    from .workloads import load_workload

    distances = parse_distances(distance)
    if width is not None and width < 1:
        raise UsageError(f"--width must be at least 1, got {width}")
    if out.is_file():
        raise UsageError(f"--out {out} is a file; give a folder")
    if not overwrite and any((out / name).exists() for name in (WEIGHTS, METADATA)):
        raise UsageError(f"{out} already holds predictors; pass --overwrite to replace them")
    chosen = load_workload(workload).with_overrides(num_requests=num_requests, output_tokens=gen_len)
    excluded = [load_workload(name) for name in exclude_workload]
    path = resolve_checkpoint(model)
    config = RunConfig(device=device)  # validates --device
    predictors = train_predictors(path, chosen, distances, width, seed, config.torch_device(), excluded,
                                  progress=True)
    meta = predictors.meta
    meta["model"] = model  # as the user named it ("builtin", a hub id), not this machine's path
    predictors.save(out)
    click.echo(f"trained {len(predictors.mlps)} predictors on {meta['tokens']['train']} tokens "
               f"({meta['requests']['train']} requests) in {meta['seconds']} s; eval recall@{meta['top_k']} "
               f"on {meta['tokens']['eval']} tokens of {meta['requests']['eval']} held-out requests:")
    click.echo(f"{'source':>6} {'target':>6} {'learned':>8} {'gate':>6}")
    for row in meta["eval"]:
        click.echo(f"{row['source']:>6} {row['target']:>6} {row['recall']:>8.3f} {row['gate_recall']:>6.3f}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--strategy", default=None, help="One strategy of the run [default: all, one process each].")
@click.option("--repeat", type=int, default=None, help="Which repeat [default: the first measured one].")
@click.option("--steps", default=None, help="Generation steps A:B (B excluded), A:, :B or A; 0 is the prefill.")
@click.option("--max-events", type=int, default=500_000, show_default=True,
              help="Cap: whole steps are kept in order while they fit, so a long run still opens.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The trace's JSON file.")
def trace(run_folder, strategy, repeat, steps, max_events, out):
    """Export a run's timeline as Chrome trace JSON (open in ui.perfetto.dev or chrome://tracing)."""
    import json

    from .chrome_trace import chrome_trace, parse_steps, select
    from .results import load_run, load_timeline

    if max_events < 1:
        raise UsageError(f"--max-events must be at least 1, got {max_events}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as trace.json")
    _, tables = load_run(run_folder)
    rows, note = select(load_timeline(run_folder), strategy, repeat, parse_steps(steps or ":"), max_events)
    document = chrome_trace(rows, tables.get("samples"))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(out)  # a half-written trace never replaces a good one
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out}: {len(document['traceEvents'])} events; open it in ui.perfetto.dev")


@main.command()
@click.argument("run_folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", default=None, help="Strategy the speedups are computed against [default: each run's own].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The report's HTML file.")
def report(run_folders, baseline, out):
    """One self-contained HTML report (plotly) of one or more run folders: sweeps and commits side by side."""
    from .report import write_report

    size = write_report(list(run_folders), baseline, out)
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB); it opens offline in any browser")


@main.command()
@click.option("--trace", "trace_path", type=click.Path(path_type=Path), required=True,
              help="A routing log (run --record-trace, import-trace or synth-trace).")
@click.option("--hardware", default=None, help="A hardware profile (see `promoe-bench profiles`) or TOML file.")
@click.option("--model-profile", default=None, help="A model profile, a config.json or a checkpoint folder.")
@click.option("--precision", default="fp16", show_default=True, help="Expert weights: fp16, int8 or int4.")
@click.option("--measured", type=click.Path(path_type=Path), default=None,
              help="Instead of profiles: a CPU run folder whose measured costs replay its own recorded log.")
@click.option("--compute-of", default=None,
              help="With --measured: every strategy replays this strategy's measured compute (e.g. full_gpu, "
                   "which no copy disturbed), keeping its own prediction cost: copying that takes no compute.")
@click.option("--strategy", "strategies", default="all", show_default=True, help="As for `run`.")
@click.option("--cache-rate", default="0.5", show_default=True, help="One or more, comma-separated: 0.25,0.5,0.75.")
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True, help="Warm-up passes over the log, excluded.")
@click.option("--baseline", default="lru", show_default=True)
@click.option("--layer-map", default=None, help="cycle or truncate: project a log onto a model with other layers.")
@click.option("--no-timeline", is_flag=True, help="Keep no timeline (a long log replays faster).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/simulated"), show_default=True)
@click.option("--overwrite", is_flag=True)
def simulate(trace_path, hardware, model_profile, precision, measured, compute_of, strategies, cache_rate, repeats,
             warmup, baseline, layer_map, no_timeline, out, overwrite):
    """Replay a routing log under strategies on modelled hardware; write a run folder marked simulated."""
    from .simulate import SimConfig
    from .simulate import simulate as run_simulation
    from .summary import format_table

    try:
        rates = tuple(float(r) for r in cache_rate.split(","))
    except ValueError:
        raise UsageError(f"--cache-rate {cache_rate!r}: expected numbers separated by commas") from None
    cfg = SimConfig(trace_path, hardware, model_profile, precision, measured, compute_of, strategies, rates, repeats,
                    warmup, baseline, layer_map, not no_timeline, out, overwrite)
    summary, folder, notes = run_simulation(cfg)
    for note in notes:
        click.echo(note)
    click.echo(format_table(summary, baseline))
    click.echo(f"wrote {folder}")


@main.command("import-trace")
@click.argument("log", type=click.Path(path_type=Path))
@click.option("--num-experts", type=int, default=None, help="Experts per layer [default: the largest id + 1].")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def import_trace(log, num_experts, out):
    """Import a JSON-lines routing log ({layer, token_pos, experts, gating_probs} per line)."""
    from .routing_import import import_jsonl

    imported = import_jsonl(log, num_experts)
    imported.save(out)
    gaps = imported.gaps()
    click.echo(f"{len(imported.counts)} forwards, {imported.num_layers} layers, {imported.num_experts} experts, "
               f"top-{imported.top_k}; gaps: {gaps.get('missing_rows', 0)} token-layers missing "
               f"({gaps.get('missing_layer_steps', 0)} layer-steps without any)")
    click.echo(f"wrote {out}")


@main.command("synth-trace")
@click.option("--layers", type=int, required=True)
@click.option("--experts", type=int, required=True)
@click.option("--top-k", type=int, required=True)
@click.option("--prompt-tokens", type=int, default=256, show_default=True)
@click.option("--decode-steps", type=int, default=128, show_default=True)
@click.option("--batches", type=int, default=1, show_default=True, help="Requests, one after another.")
@click.option("--skew", type=float, default=1.0, show_default=True, help="Zipf exponent of expert popularity.")
@click.option("--repeat", type=float, default=0.3, show_default=True,
              help="Probability a token reuses the previous token's experts.")
@click.option("--cross-layer", type=float, default=0.5, show_default=True,
              help="Probability a pick follows a fixed map of the layer before.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def synth_trace(layers, experts, top_k, prompt_tokens, decode_steps, batches, skew, repeat, cross_layer, seed, out):
    """Make a SYNTHETIC routing log with stated structure (marked synthetic wherever its results appear)."""
    from .routing_synthetic import synthetic_log

    synthetic_log(layers, experts, top_k, prompt_tokens, decode_steps, batches, skew, repeat, cross_layer,
                  seed).save(out)
    click.echo(f"wrote {out} (synthetic)")


@main.command()
def profiles():
    """List the shipped hardware and model profiles."""
    from .profiles import shipped_hardware, shipped_model_profiles

    click.echo("hardware:")
    for name, hw in shipped_hardware().items():
        click.echo(f"  {name:<16} {hw.h2d_gbps:>6.1f} GB/s h2d, {hw.memory_gb:>5.0f} GB, {hw.fp16_tflops:>6.1f} "
                   f"TFLOP/s fp16: {hw.description}")
    click.echo("models:")
    for name, model in shipped_model_profiles().items():
        click.echo(f"  {name:<18} {model.moe_layers} MoE layers, {model.experts} experts, top-{model.top_k}, "
                   f"{model.expert_bytes('fp16') / 1e6:.1f} MB per fp16 expert")


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--metric", "metrics", multiple=True,
              help="[STRATEGY:]NAME=THRESHOLD, e.g. tpot_ms=5% or lru:copied_bytes=0 (repeatable).")
@click.option("--only", type=click.Choice(["counter", "time"]), default=None,
              help="Only counters (deterministic: CI on any machine) or only wall-clock times.")
@click.option("--alpha", type=float, default=0.01, show_default=True,
              help="Significance a wall-clock regression needs (one-sided Mann-Whitney U).")
@click.option("--format", "form", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
def compare(base, new, metrics, only, alpha, form):
    """Compare two runs (or a run and a baseline file) strategy by strategy; exit 1 on a regression."""
    from .compare import compare as compare_runs
    from .compare import load_side, parse_thresholds, render

    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {alpha}")
    thresholds = parse_thresholds(list(metrics))
    before, after = load_side(base), load_side(new)
    table = compare_runs(before, after, thresholds, alpha, only)
    if table.empty:
        raise UsageError(f"{base} and {new} have no strategy in common to compare")
    click.echo(render(table, form, before, after))
    sys.exit(1 if (table["verdict"] == "regressed").any() else 0)


@main.command()
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--strategy", "label", default="lru", show_default=True,
              help="Whose cache size and link to bound (a label of the run, e.g. 'lru[cache_rate=0.25]').")
def bound(run_folder, label):
    """The least TTFT any policy with per-layer caches could reach on a run's prompts (needs full_gpu in the
    run), against each strategy of that cache size."""
    from .bounds import against_bound, expert_copy_s, prompt_bounds
    from .results import load_run

    meta, tables = load_run(run_folder)
    bounds = prompt_bounds(meta, tables, label)
    click.echo(f"{label}: {meta['strategies'][label]['cache_slots_per_layer']} slots per layer, "
               f"{expert_copy_s(meta, label) * 1e3:.3f} ms per expert copied, "
               f"{bounds.routed.median():.0f} experts routed per prompt layer (median)")
    click.echo(f"least TTFT any per-layer-cache policy could reach: {bounds.bound_s.median() * 1e3:.1f} ms "
               f"(median over {len(bounds)} prompts)")
    table = against_bound(meta, tables, label, bounds)
    click.echo(table.round(2).to_string(header=["TTFT ms", "x the bound"], index_names=False))


@main.command()
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The baseline file (JSON).")
def baseline(run_folder, out):
    """Reduce a run folder to a baseline file for `compare` (counters and samples per strategy)."""
    from .compare import save_baseline

    document = save_baseline(run_folder, out)
    click.echo(f"wrote {out}: {len(document['strategies'])} strategies, {document['setup']['kind']} run")


@main.command()
def strategies():
    """List the registered offload strategies."""
    from .strategies import available

    for name, cls in available().items():
        click.echo(f"{name:<12} {cls.summary}")


@main.command()
def models():
    """List the built-in model and the supported checkpoint families."""
    from .builtin_model import BUILTIN_DIR, builtin_config
    from .families import SUPPORTED_FAMILIES

    config = builtin_config()
    shape = (f"{config['num_hidden_layers']} layers, {config['num_local_experts']} experts, "
             f"top-{config['num_experts_per_tok']}")
    click.echo(f"{'builtin':<12} small mixtral-style MoE trained on Python's docs ({shape}), in {BUILTIN_DIR}")
    for family in SUPPORTED_FAMILIES:
        click.echo(f"{family:<12} any Hugging Face checkpoint of this family (folder or hub id)")


@main.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def doctor(device):
    """What this machine offers: torch, the device, NVML counters, host-to-device bandwidth, model families."""
    from .doctor import report

    for line in report(RunConfig(device=device).torch_device()):  # RunConfig validates --device
        click.echo(line)


if __name__ == "__main__":
    main()

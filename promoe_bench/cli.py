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
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", default="auto", show_default=True, help="auto (the checkpoint's), float32, bfloat16, float16.")
@click.option("--link-gbps", type=float, default=DEFAULT_LINK_GBPS, show_default=True,
              help="Emulated host-to-device bandwidth (--device cpu only).")
@click.option("--link-latency-us", type=float, default=DEFAULT_LINK_LATENCY_US, show_default=True,
              help="Emulated per-copy latency (--device cpu only).")
@click.option("--prompt-len", type=int, default=64, show_default=True)
@click.option("--gen-len", type=int, default=32, show_default=True, help="Output tokens per request.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Measured repeats.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Warm-up repeats, recorded and excluded.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--baseline", default="lru", show_default=True, help="Strategy the speedups are measured against.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
def run(**options):
    """Run strategies on one model and workload; print a comparison and write a run folder."""
    from .bench import run as run_benchmark  # torch and transformers load only for commands that need them
    from .summary import format_table

    cfg = RunConfig(**options)
    summary, out = run_benchmark(cfg)
    if cfg.torch_device().type == "cpu":
        click.echo(f"device: cpu, emulated host-to-device link at {cfg.link_gbps} GB/s + "
                   f"{cfg.link_latency_us} us per copy (timings are emulated, not PCIe)")
    click.echo(format_table(summary, cfg.baseline))
    if cfg.baseline not in set(summary["strategy"]):
        click.echo(f"note: no speedups: the baseline {cfg.baseline} was not among the strategies run", err=True)
    if not summary["tokens_match"].all():
        click.echo("warning: some strategies produced different tokens than full_gpu (see summary.csv)", err=True)
    click.echo(f"wrote {out}")


@main.command()
def strategies():
    """List the registered offload strategies."""
    from .strategies import available

    for name, cls in available().items():
        click.echo(f"{name:<12} {cls.summary}")


@main.command()
def models():
    """List the built-in model and the supported checkpoint families."""
    from .builtin_model import CONFIG, cache_dir
    from .families import SUPPORTED_FAMILIES

    shape = (f"{CONFIG['num_hidden_layers']} layers, {CONFIG['num_local_experts']} experts, "
             f"top-{CONFIG['num_experts_per_tok']}")
    click.echo(f"{'builtin':<12} mixtral-style MoE made on first use ({shape}), cached in {cache_dir()}")
    for family in SUPPORTED_FAMILIES:
        click.echo(f"{family:<12} any Hugging Face checkpoint of this family (folder or hub id)")


if __name__ == "__main__":
    main()

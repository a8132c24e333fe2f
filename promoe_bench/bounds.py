"""The least time any offload policy with per-layer caches could take to fill a run's prompts on its link.

Once layer l's router has chosen R experts and the layer has S slots, at most S of them can be on the
device when its first expert starts (a copy made earlier into an occupied slot evicts an expert the layer
also uses, to be copied again), so at least R - S whole copies follow, one after another on the link;
and layer l+1 cannot start before layer l's experts have run. A prompt therefore takes at least the sum
over layers of [non-expert and router time + max(expert compute, (R - S) copies)], plus the head. No
prediction, ordering or replacement gets under it. Compute is full_gpu's, which no copy disturbed.
"""

import pandas as pd

from .cache import NUM_CHUNKS
from .errors import UsageError

COMPUTE = ["non_expert_s", "router_s", "expert_s"]


def expert_copy_s(meta: dict, label: str) -> float:
    """One whole expert over `label`'s link: its bytes at the bandwidth, plus a latency per chunk."""
    link = meta["strategies"][label]["link"]
    if link["kind"] == "emulated":
        latency_s, bytes_per_s = link["latency_us"] * 1e-6, link["gbps"] * 1e9
    elif (link.get("costs") or {}).get("kind") == "profile":
        from .profiles import load_hardware

        hardware = load_hardware(meta["config"]["hardware"])
        latency_s, bytes_per_s = hardware.copy_latency_us * 1e-6, hardware.h2d_gbps * 1e9
    else:
        raise UsageError(f"{label}'s link ({link['kind']}) has no set bandwidth: a bound reads runs on the emulated "
                         "link and simulations on a hardware profile")
    return NUM_CHUNKS * latency_s + meta["model"]["expert_bytes"] / bytes_per_s


def prompt_bounds(meta: dict, tables: dict[str, pd.DataFrame], label: str) -> pd.DataFrame:
    """Per measured prompt (repeat, batch): `bound_s`, the least TTFT with `label`'s slots and link, and
    `routed`, the median experts a layer of it routed."""
    strategies = meta["strategies"]
    full_gpu = next((name for name in strategies if name.split("[")[0] == "full_gpu"), None)
    if full_gpu is None:
        raise UsageError("a prompt bound needs full_gpu in the run (its prompts give the compute); run it too")
    if label not in strategies:
        raise UsageError(f"no strategy {label!r} in the run; it has {', '.join(strategies)}")
    slots = strategies[label]["cache_slots_per_layer"]
    layers = tables["layers"]
    prompts = layers[(layers.strategy == full_gpu) & ~layers.warmup & (layers.phase == "prefill")].copy()
    if prompts.empty or prompts[COMPUTE].isna().any(axis=None):
        raise UsageError(f"{full_gpu} has no per-layer times of its prompts in this run "
                         "(simulated with --no-timeline?)")
    prompts["routed_n"] = prompts.routed.astype(str).str.split().str.len()
    mandatory_s = (prompts.routed_n - slots).clip(lower=0) * expert_copy_s(meta, label)
    prompts["bound_s"] = prompts.non_expert_s + prompts.router_s + prompts.expert_s.clip(lower=mandatory_s)
    keys = ["repeat", "batch"]
    bounds = prompts.groupby(keys).agg(bound_s=("bound_s", "sum"), routed=("routed_n", "median"))
    requests = tables["requests"]
    ttft = requests[(requests.strategy == full_gpu) & ~requests.warmup].groupby(keys).ttft_s.first()
    bounds["bound_s"] += ttft - prompts.groupby(keys)[COMPUTE].sum().sum(axis=1)  # the head, outside the layers
    return bounds


def against_bound(meta: dict, tables: dict[str, pd.DataFrame], label: str, bounds: pd.DataFrame) -> pd.DataFrame:
    """Each strategy with `label`'s cache size: its median TTFT and the median over prompts of how many
    times the prompt's bound (`prompt_bounds`) it took."""
    slots = meta["strategies"][label]["cache_slots_per_layer"]
    alike = [name for name, facts in meta["strategies"].items() if facts["cache_slots_per_layer"] == slots]
    requests = tables["requests"]
    prompts = (requests[requests.strategy.isin(alike) & ~requests.warmup]
               .groupby(["strategy", "repeat", "batch"], sort=False).ttft_s.first().reset_index()
               .merge(bounds.reset_index(), on=["repeat", "batch"]))
    prompts["times_bound"] = prompts.ttft_s / prompts.bound_s
    table = prompts.groupby("strategy", sort=False).agg(ttft_ms=("ttft_s", "median"),
                                                        times_bound=("times_bound", "median"))
    table["ttft_ms"] *= 1e3
    return table

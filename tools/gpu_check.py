"""The Python steps of tools/gpu_check.sh (one command each, so that one failing loses none of the others).

  python3 tools/gpu_check.py environment OUT               versions, CUDA, the transformers the project needs
  python3 tools/gpu_check.py checkpoint FOLDER SHAPE DTYPE  an OLMoE-shaped checkpoint (random weights), real format
  python3 tools/gpu_check.py syncs MODEL DEVICE DTYPE FILE  host syncs per decode step, per strategy (JSON)
  python3 tools/gpu_check.py table RESULTS FILE             the short table of what RESULTS holds

Runs from a checkout with the checkout on PYTHONPATH (no install), as on a lent GPU machine.
"""

import json
import sys
import time
from pathlib import Path

OLMOE_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "models" / "olmoe-1b-7b.json"
SYNC_STRATEGIES = ["full_gpu", "on_demand", "lru", "static", "skip_gate", "promoe[predictor=gate]",
                   "promoe[predictor=oracle]", "oracle"]


def environment(out: Path) -> int:
    """Versions first: an older transformers than pyproject asks for decodes without the KV cache (its
    generate takes `cache=` into **kwargs) and lacks the experts interface the runtime registers with."""
    import tomllib
    from importlib.metadata import version

    import torch
    from packaging.requirements import Requirement

    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"CUDA available: {torch.cuda.is_available()}"
             + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")]
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    failed = []
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        try:
            have = version(requirement.name)
        except Exception:  # importlib.metadata's PackageNotFoundError, or a broken install
            have = None
        ok = have is not None and requirement.specifier.contains(have, prereleases=True)
        lines.append(f"{requirement.name} {have or 'missing'}" + ("" if ok else f" (needs {requirement.specifier})"))
        if not ok and requirement.name != "torch":
            failed.append(requirement.name)
    (out / "environment.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        print(f"gpu_check: missing or too old: {', '.join(failed)}; carry their wheels in .whl/ "
              "(tools/gpu_wheels.sh)", file=sys.stderr)
        return 1
    return 0


def checkpoint(folder: Path, shape: str, dtype: str) -> int:
    """OLMoE-1B-7B's real layer shapes (hidden 2048, 64 experts of 1024, top-8: 12.6 MB an expert in bf16),
    `shape` overriding (JSON: fewer layers, or tiny sizes for the CPU), random weights with routers spread
    so routing varies, written with save_pretrained: copies of real-sized experts take real time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / "config.json").exists():
        profile = json.loads(OLMOE_PROFILE.read_text())
        fields = {k: v for k, v in profile.items()
                  if not k.startswith("_") and k not in ("architectures", "model_type")}
        config = AutoConfig.for_model("olmoe", **{**fields, **json.loads(shape)})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("gate.weight") and param.dim() == 2:
                    param.normal_(0, 1.0)
        model.save_pretrained(folder)
    experts = sum(p.numel() * p.element_size() for name, p in _experts(folder))
    print(f"{folder}: {experts / 1e9:.2f} GB of experts")
    return 0


def _experts(folder: Path):
    from safetensors import safe_open

    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if ".experts." in key:
                    yield key, f.get_tensor(key)


def syncs(model: str, device_name: str, dtype: str, out: Path) -> int:
    """Per strategy, the host syncs of compute's thread in each decode step, against what must stay: one
    routing read per MoE layer and one read per prediction made from hidden states. Written to `out`."""
    import torch

    from promoe_bench import bench
    from promoe_bench.config import RunConfig, flag_workload
    from promoe_bench.generation import generate
    from promoe_bench.offload import OffloadRuntime
    from promoe_bench.sync_audit import CudaSyncs, StepSyncs, SyncAudit

    device = torch.device(device_name)
    cfg = RunConfig(model=model, device=device_name, dtype=dtype, workload=flag_workload(prompt_len=32, gen_len=6),
                    repeats=1, warmup=0)
    loaded = bench.load_model(cfg, device)
    batch = bench.make_batches(cfg.workload, loaded)[0]
    full = bench.record_routing(loaded, cfg, device, [batch], (bench.resolve("full_gpu")[0], loaded.store.num_experts))
    trace = bench.routing_trace(full)
    rows = []
    for spec in SYNC_STRATEGIES:
        strategy = bench.resolve(spec)[0]
        capacity = bench.strategy_capacity(strategy, loaded, cfg.cache_rate, None)
        runtime = OffloadRuntime(loaded, strategy, capacity, bench.make_link(cfg, device), device,
                                 trace=trace if strategy.needs_trace else None)
        audit = CudaSyncs(device) if device.type == "cuda" else SyncAudit()
        steps = StepSyncs(runtime, audit)
        try:
            with bench.on_device(device), audit:
                generate(loaded.model, batch.input_ids.to(device), cfg.workload.output_tokens, runtime,
                         attention_mask=batch.attention_mask, strategy=spec, batch=0)
        finally:
            runtime.close()
        # decode steps but the last, which also holds the generated tokens' one read after the loop
        measured = steps.per_step()[1:-1]
        expected = [loaded.store.num_layers + n for n in steps.predictions[1:-1]]
        rows.append({"strategy": spec, "measured_per_decode_step": measured, "expected_per_decode_step": expected,
                     "by_caller": {f"{caller}: {what}": n for (caller, what), n in audit.calls.items()}})
        print(f"{spec}: {measured} host syncs per decode step, expected {expected}; {rows[-1]['by_caller']}")
    out.write_text(json.dumps({"model": model, "device": device_name, "strategies": rows}, indent=1))
    return 0


def table(results: Path, out: Path) -> int:
    """The short table of what is in `results`, written to `out`: per run and strategy TTFT, TPOT, hit rate,
    stall share, same tokens, the link's and NVML's PCIe GB/s in decode, and the link's against the doctor's
    pinned copy rate; host syncs per decode step against the expected count."""
    from promoe_bench.results import load_run

    lines, pinned = [], None
    doctor = results / "doctor.txt"
    for line in doctor.read_text().splitlines() if doctor.exists() else []:
        if line.startswith("host-to-device copy"):
            lines.append(f"doctor: {line}")
            pinned = float(line.split("pinned ")[1].split()[0])
    for folder in sorted(p for p in results.iterdir() if (p / "run.json").exists()):
        meta, tables = load_run(folder)
        lines += ["", f"{folder.name} ({meta['model']['dtype']}, tokens against {meta.get('tokens_reference')}):", "",
                  "| strategy | TTFT ms | TPOT ms | hit rate | stall share | same tokens | decode link GB/s | "
                  "decode PCIe GB/s | link / pinned | dispatch us/layer |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in tables["summary"].to_dict("records"):
            link = row.get("decode_link_gbps")
            dispatch = meta["strategies"][row["strategy"]].get("dispatch_host_us_per_layer") or {}
            lines.append(f"| {row['strategy']} | {_number(row['ttft_ms'])} | {_number(row['tpot_ms'], 2)} | "
                         f"{_number(row['hit_rate'], 3)} | {_number(row['stall_share'], 3)} | {row['tokens_match']} | "
                         f"{_number(link)} | {_number(row.get('decode_pcie_gbps'))} | "
                         f"{_number(link / pinned if pinned and _is_number(link) else None, 2)} | "
                         f"{_number(dispatch.get('decode'))} |")
        lines += [f"| {label} | skipped: {why} |" for label, why in meta.get("skipped", {}).items()]
    for path in sorted(results.glob("syncs-*.json")):
        data = json.loads(path.read_text())
        lines += ["", f"host syncs per decode step, {data['model']} on {data['device']}:", "",
                  "| strategy | measured | expected |", "|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['measured_per_decode_step']} | {r['expected_per_decode_step']} |"
                  for r in data["strategies"]]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and value == value


def _number(value, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    started = time.perf_counter()
    if command == "environment":
        code = environment(Path(args[0]))
    elif command == "checkpoint":
        code = checkpoint(Path(args[0]), args[1], args[2])
    elif command == "syncs":
        code = syncs(args[0], args[1], args[2], Path(args[3]))
    elif command == "table":
        code = table(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"gpu_check.py: unknown step {command}")
    print(f"[{command}: {time.perf_counter() - started:.1f} s]")
    sys.exit(code)

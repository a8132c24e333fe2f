#!/usr/bin/env bash
# The checks and figures that need a GPU, as one run for a lent machine (device time is scarce: this takes
# about 5 minutes on an H200). Uses the machine's own python3 (torch, transformers, safetensors and
# nvidia-ml-py are there; nothing is installed) and the checkout on PYTHONPATH.
#
#   tools/gpu_check.sh OUT          what needs the GPU, written under OUT, and a short table at the end;
#                                   OUT/results.tgz holds the run folders without timelines or the checkpoint
#   SMOKE=1 tools/gpu_check.sh OUT  the same plumbing on the CPU with tiny shapes, to try this script here
#
# A lent machine reaches no registry and its transformers may be older than ours (5.17 there, >= 5.24 here):
# carry the wheel (.whl/ is git-ignored). Here: python3 -m pip download --no-deps \
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#   transformers==5.24.0
# then the device tool's run, carry [".whl"]:  tools/gpu_check.sh /tmp/check && cp /tmp/check/*.txt \
#   /tmp/check/results.tgz "$OUT"/   (wheels in .whl/ are installed to /tmp/site first, nothing else)
#
# 1. doctor: the device, NVML's counters, pinned and pageable host-to-device GB/s;
# 2. the built-in model, every strategy, `chat`: tokens against full_gpu, CUDA-event timings, NVML counters;
# 3. OLMoE-1B-7B's real layer shapes (4 of its 16 layers, random weights with decisive routers, bf16), the
#    strategies that need no learned predictor, random 256-token prompts: copies of real-sized experts
#    (12.6 MB) over the real link, to compare promoe with lru where prediction runs on its own stream;
# 4. the benchmarks (runtime overhead against transformers, the experts call, the copy engine) on the GPU.
set -euo pipefail
out=$(realpath -m "${1:?usage: tools/gpu_check.sh OUT}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
bench() { python3 -m promoe_bench.cli "$@"; }

if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu dtype=float32 shape='{"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 32,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 16, "vocab_size": 512,
    "eos_token_id": null, "pad_token_id": null}'
  requests=1 prompt=16 gen=4 builtin_requests=1
else
  device=cuda dtype=bfloat16 shape='{"num_hidden_layers": 4}' requests=4 prompt=256 gen=64 builtin_requests=4
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv \
    | tee "$out/nvidia-smi.txt"
fi

bench doctor | tee "$out/doctor.txt"

bench run --device "$device" --strategy all --workload chat --num-requests "$builtin_requests" --repeats 2 \
  --out "$out/builtin-chat" --overwrite 2>&1 | tee "$out/builtin-chat.txt"

python3 - "$out/olmoe-shape" "$shape" "$dtype" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
folder, overrides, dtype = Path(sys.argv[1]), json.loads(sys.argv[2]), getattr(torch, sys.argv[3])
if not (folder / "config.json").exists():
    profile = json.loads(Path("profiles/models/olmoe-1b-7b.json").read_text())
    fields = {k: v for k, v in profile.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    config = AutoConfig.for_model("olmoe", **{**fields, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # random init routes nearly every token alike; spread the routers so routing varies
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2:
                param.normal_(0, 1.0)
    model.save_pretrained(folder)
print(f"{folder}: {sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 1e9:.2f} GB of safetensors")
EOF

bench run --model "$out/olmoe-shape" --device "$device" --dtype "$dtype" --prompt-len "$prompt" --gen-len "$gen" \
  --num-requests "$requests" --repeats 2 --out "$out/olmoe-shape-run" --overwrite \
  --strategy "full_gpu,on_demand,lru,lru[chunked=1],static,skip_gate,promoe[predictor=gate],promoe[predictor=oracle],oracle" \
  2>&1 | tee "$out/olmoe-shape-run.txt"

if [ "${SMOKE:-0}" != 1 ]; then
  timeout 240 python3 -m pytest tests/benchmarks --benchmark-enable -q -p no:cacheprovider -k "not simulator" \
    --benchmark-json "$out/benchmarks.json" 2>&1 | tail -40 | tee "$out/benchmarks.txt" \
    || echo "benchmarks stopped or failed: the table below still stands"
fi

tar czf "$out/results.tgz" -C "$out" --exclude=timeline builtin-chat olmoe-shape-run

python3 - "$out" <<'EOF'
import sys
from pathlib import Path
from promoe_bench.results import load_run
out = Path(sys.argv[1])
print("\n| run | strategy | TTFT ms | TPOT ms | hit rate | decode PCIe GB/s | same tokens |\n|---|---|---|---|---|---|---|")
for run in ("builtin-chat", "olmoe-shape-run"):
    summary = load_run(out / run)[1]["summary"]
    for row in summary.itertuples(index=False):
        print(f"| {run} | {row.strategy} | {row.ttft_ms:.1f} | {row.tpot_ms:.2f} | {row.hit_rate:.1%} | "
              f"{row.decode_pcie_gbps:.1f} | {row.tokens_match} |")
EOF

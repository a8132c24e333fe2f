#!/usr/bin/env bash
# The checks and figures that need a GPU, as one command for a lent machine (at most 6 minutes of its time).
# Runs from a checkout with the checkout on PYTHONPATH, nothing installed, no network: the machine's own
# python3 and packages, and any wheels carried in .whl/ (tools/gpu_wheels.sh fetches them here).
#
#   tools/gpu_check.sh OUT          on the GPU (cuda, bfloat16); the device tool: `tools/gpu_check.sh "$OUT"`
#                                   with carry [".whl"]
#   SMOKE=1 tools/gpu_check.sh OUT  the same steps on the CPU with tiny shapes: CI runs this from a bare copy
#                                   of the tree, as the GPU machine will have it
#
# OUT holds four files, each rewritten as soon as a step adds to it, so a failure or a time-out loses only
# what had not run: log.txt (every step's output), steps.txt (each step: ok or FAILED, seconds),
# summary.md (the short table), results.tgz (run folders without timelines, doctor, host syncs, Chrome
# traces of one decode step per strategy, benchmark JSON). A step that fails does not stop the others.
#
# Steps: environment (versions, CUDA, the transformers pyproject needs) -> doctor (pinned and pageable
# host-to-device GB/s) -> the built-in model, every strategy, `chat` -> an OLMoE-shaped checkpoint with
# 1.6 GB of experts, its strategies (on_demand is the copy-bound run: its decode link GB/s against the
# doctor's pinned figure) -> host syncs per decode step under each strategy -> Chrome traces -> benchmarks.
set -uo pipefail
out=$(realpath -m "${1:?usage: tools/gpu_check.sh OUT}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
: > "$out/log.txt"
: > "$out/steps.txt"
keep=$(mktemp -d)  # what results.tgz holds
work=$(mktemp -d)  # the rest: the checkpoint, timelines
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$out/log.txt"
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit; output to log.txt, a line to steps.txt
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    echo "$name: ok, $((SECONDS - start)) s" | tee -a "$out/steps.txt"
  else
    echo "$name: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', time limit')), $((SECONDS - start)) s" \
      | tee -a "$out/steps.txt"
    failed=1
  fi
  return "$rc"
}
publish() {  # results.tgz and summary.md from what has run so far
  local run
  for run in "$work"/runs/*; do
    [ -f "$run/run.json" ] || continue
    mkdir -p "$keep/${run##*/}"
    find "$run" -maxdepth 1 -type f ! -name 'timeline*' -exec cp {} "$keep/${run##*/}/" \;
  done
  tar czf "$out/results.tgz.tmp" -C "$keep" . && mv "$out/results.tgz.tmp" "$out/results.tgz"
  python3 tools/gpu_check.py table "$keep" "$out/summary.md" > /dev/null 2>> "$out/log.txt"
}
bench=(python3 -m promoe_bench.cli)

if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu dtype=bfloat16
  shape='{"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_experts": 16, "vocab_size": 512, "eos_token_id": null, "pad_token_id": null}'
  builtin=(--num-requests 1 --gen-len 4 --repeats 1 --warmup 0)
  big=(--prompt-len 16 --gen-len 4 --num-requests 1 --repeats 1 --warmup 0)
else
  device=cuda dtype=bfloat16 shape='{"num_hidden_layers": 2}'
  builtin=(--num-requests 4 --repeats 2)
  big=(--prompt-len 256 --gen-len 32 --num-requests 4 --repeats 2)
fi
mkdir -p "$work/runs"

if ! step environment 120 python3 tools/gpu_check.py environment "$keep"; then
  echo "gpu_check: the environment cannot run the suite (see log.txt); stopping" | tee -a "$out/log.txt"
  publish
  exit 1
fi
if [ "$device" = cuda ]; then
  if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: torch sees no CUDA device; stopping" | tee -a "$out/steps.txt" "$out/log.txt"
    publish
    exit 1
  fi
  step nvidia-smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv
fi
step doctor 120 bash -c "python3 -m promoe_bench.cli doctor --device $device | tee '$keep/doctor.txt'"
publish

step builtin-chat 300 "${bench[@]}" run --device "$device" --dtype "$dtype" --strategy all --workload chat "${builtin[@]}" \
  --out "$work/runs/builtin-chat" --overwrite
publish

olmoe=$work/olmoe-shape
if step checkpoint 300 python3 tools/gpu_check.py checkpoint "$olmoe" "$shape" "$dtype"; then
  step olmoe-shape 300 "${bench[@]}" run --model "$olmoe" --device "$device" --dtype "$dtype" "${big[@]}" \
    --strategy "full_gpu,on_demand,lru,lru[chunked=1],static,skip_gate,promoe[predictor=gate],promoe[predictor=oracle],oracle" \
    --out "$work/runs/olmoe-shape" --overwrite
fi
publish

step syncs-builtin 300 python3 tools/gpu_check.py syncs builtin "$device" "$dtype" "$keep/syncs-builtin.json"
[ -f "$olmoe/config.json" ] && step syncs-olmoe-shape 300 python3 tools/gpu_check.py syncs "$olmoe" "$device" "$dtype" \
  "$keep/syncs-olmoe-shape.json"
for run in builtin-chat olmoe-shape; do
  [ -f "$work/runs/$run/run.json" ] && step "trace-$run" 120 "${bench[@]}" trace "$work/runs/$run" --steps 2 \
    --out "$keep/trace-$run.json"
done
publish

if [ "${SMOKE:-0}" = 1 ]; then
  benchmark=(--benchmark-disable -k "full_gpu_against")  # that the step runs, not its figures
else
  benchmark=(--benchmark-enable -k "not simulator" --benchmark-json "$keep/benchmarks.json")
fi
step benchmarks 240 python3 -m pytest tests/benchmarks -q -p no:cacheprovider "${benchmark[@]}"
publish

cat "$out/summary.md"
echo "steps:" && cat "$out/steps.txt"
exit "$failed"

#!/usr/bin/env bash
# The regression baselines of CI: the built-in model on the emulated link, and the public Mixtral log
# simulated on two hardware profiles.
#   results/baselines.sh check    compare what this tree does with the committed baselines (counters only:
#                                 bytes copied, hits, misses, evictions, and simulated times); exit 1 on a
#                                 regression. `.ci/run` runs this.
#   results/baselines.sh update   rewrite results/*.json after an intended change (commit them with it).
set -euo pipefail
mode=${1:?usage: results/baselines.sh check|update}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

promoe-bench run --strategy all --repeats 1 --warmup 1 --out "$work/builtin-emulated" > /dev/null
promoe-bench import-trace traces/mixtral-8x7b-humaneval-0.jsonl --out "$work/mixtral.log" > /dev/null
for hardware in rtx4090 h100-pcie; do
  promoe-bench simulate --trace "$work/mixtral.log" --hardware "$hardware" --model-profile mixtral-8x7b \
    --precision int4 --strategy all --no-timeline --out "$work/sim-$hardware-mixtral" > /dev/null
done

status=0
for name in builtin-emulated sim-rtx4090-mixtral sim-h100-pcie-mixtral; do
  if [ "$mode" = update ]; then
    promoe-bench baseline "$work/$name" --out "results/$name.json"
  else
    promoe-bench compare "results/$name.json" "$work/$name" --only counter --format markdown || status=$?
  fi
done
exit "$status"

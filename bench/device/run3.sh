#!/usr/bin/env bash
# Device call 3 (one nvidia-h200, about 7 minutes): issue 10's fp32 figure (DPO at docker/dpo.env's learning rate on
# the llm-jp-3-1.8b shape: how many adapter entries 10 steps change, the job's fp32 weights against TRL's bf16 cast),
# then the seed's whole workload end to end at the 13B shape through `python -m job` (bench.py's e2e).
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run3.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run3.log, fp32-updates-1.8b.json, bench-13b-run3.json, headline-run3.json.
set -u -o pipefail
NAME=run3
BUDGET=${BUDGET:-470}
source bench/device/common.sh
timeout 200 python3 bench/fp32_updates.py --shape 1.8b --steps 10 --lr 5e-6 --out "$OUT/fp32-updates-1.8b.json"
at "fp32_updates exit $?"
ready
: "${PLAN:=e2e}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1

#!/usr/bin/env bash
# Device call 17 of issue 13: a second sample of the seed's whole workload after the batched tokenization of the length
# policy (c329b06: ~3 s of each SFT start on this host before), and the job's DPO against stock TRL's DPO in one
# process (run16's deadline cut stock TRL's DPO). No tests.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run17.sh"   carry [".gpuw"]   timeout_s 420
#
# $OUT gets: run17.log, e2e-*.log.jsonl, bench-13b-run17.json.
set -u -o pipefail
NAME=run17
BUDGET=${BUDGET:-400}
source bench/device/common.sh
ready
: "${PLAN:=e2e,dpo:job:default,dpo:trl:trl_best}"
bench_run
at "bench exit $?"
at "done"
sleep 1  # let tee write the last lines

#!/usr/bin/env bash
# Device call 9 of issue 13 (one nvidia-h200, under 10 minutes): every headline figure from one process run at one
# commit, after the generations went through job/decode.py (run8: the seed's workload 143.1 s). The seed's whole
# workload first in the process (what a fresh pod sees), then the job's default SFT beside Unsloth (both of its
# modes in one process of its own) and stock TRL, the job's DPO, low memory, the seed recipe, then stock TRL's DPO
# if the deadline allows. No tests (run8 and run10 run them).
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run9.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run9.log, e2e-*.log.jsonl, bench-13b-run9.json, headline-run9.json.
set -u -o pipefail
NAME=run9
BUDGET=${BUDGET:-585}
source bench/device/common.sh
ready
: "${PLAN:=e2e,sft:job:default@20,sft:unsloth:unsloth_lowmem+unsloth@10,sft:trl:trl_best@10,dpo:job:default,sft:job:lowmem4@8,sft:seed:seed@6,dpo:trl:trl_best}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

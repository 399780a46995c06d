#!/usr/bin/env bash
# Device call 2 of issue 13 (one nvidia-h200, under 9 minutes): what run1 leaves out. The seed's whole workload
# through `python -m job` (model load included; ~3 minutes), Unsloth's low-memory mode, the DPO A/B of cuDNN in the
# masked attention path, stock TRL's DPO, then whatever fits. Same carry and output rules as run1.sh.
#
#   run: command  "BENCH_COMMIT=<short sha of the tree> bash bench/device/run2.sh"
#        carry    [".gpuw"]      timeout_s 600
#
# $OUT gets: run2.log, bench-13b-run2.json, headline-run2.json. headline.json is then made from both calls' files:
#   python bench/bench.py headline bench/results/bench-13b-run1.json bench/results/bench-13b-run2.json --out bench/results/headline.json
set -u -o pipefail
NAME=run2
source bench/device/common.sh
ready
# The seed's whole workload first (a goal, ~3 minutes), Unsloth's low-memory mode, then the DPO A/B of cuDNN in the
# masked path (same process), stock TRL's DPO, and what run1 may not have reached. PLAN=... overrides.
: "${PLAN:=e2e,sft:unsloth:unsloth_lowmem@10,dpo:job:default,dpo:job:cudnn,dpo:trl:trl_best,sft:job:dequant@8,sft:job:dropout0@8,dpo:job:lowmem4,sft:seed:seed@6,dpo:seed:seed@4}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

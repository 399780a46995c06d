#!/usr/bin/env bash
# Device call 2 of issue 13 (one nvidia-h200, under 9 minutes): what run1 leaves out. The seed's whole workload
# through `python -m job` (model load included; ~3 minutes), the DPO peers and the job's low-memory DPO, the seed
# recipe (short), and the DPO A/B of cuDNN in the masked attention path. Same carry and output rules as run1.sh.
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
PLAN=e2e,dpo:job:default,dpo:job:cudnn,dpo:trl:trl_best,dpo:job:lowmem4,sft:seed:seed@6,dpo:seed:seed@4
PLAN=$PLAN,sft:job:dequant@8,sft:job:dropout0@8,sft:trl:trl_best_gc@8
timeout $(( $(left) - 8 )) python3 bench/bench.py run --shape "$SHAPE" --work "$WORK" --out "$OUT" --tag "$NAME" --plan "$PLAN" \
  --warmup-steps 2 --deadline-s $(( $(left) - 70 ))
at "bench exit $?"
headline
at "done"

#!/usr/bin/env bash
# Device call 16 of issue 13: the headline at the final training code, in one call. The goals first (the seed's whole
# workload, the job's SFT, DPO and low memory, then the peers the ratios need: Unsloth and stock TRL), the figures that
# are not goals last (the seed recipe, stock TRL's DPO), so that a slow host's deadline cuts those, not a goal. Low
# memory after DPO: each paged-optimizer run leaves ~1 GiB allocated in the process (bench/NOTES.md), which would
# count in the next run's peak. Shorter runs than run13 (the steady figure is over the steps after the first two) so
# that the whole plan fits one call. CUDA tests while the model builds.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run16.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run16.log, pytest-cuda-run16.txt, e2e-*.log.jsonl, bench-13b-run16.json, headline-run16.json.
set -u -o pipefail
NAME=run16
BUDGET=${BUDGET:-592}
source bench/device/common.sh
cuda_tests 60 pytest-cuda-run16.txt tests/test_padfree.py tests/test_lora.py tests/test_offload.py
ready
: "${PLAN:=e2e,sft:job:default@12,dpo:job:default,sft:job:lowmem8_offload@8,sft:unsloth:unsloth_lowmem+unsloth@8,sft:trl:trl_best@8,sft:seed:seed@5,dpo:trl:trl_best}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

#!/usr/bin/env bash
# Device call 13 of issue 13 (one nvidia-h200, under 10 minutes): the headline at the final training code (the lean
# LoRA forward, job/lora.py; low memory as 8 rows per micro-batch with the checkpointed layer inputs offloaded,
# job/offload.py), run10's plan otherwise. Low memory runs before the seed recipe: each paged-optimizer run leaves
# ~1 GiB allocated in the process (1204-run11, run12), which would count in the next one's peak. CUDA tests of the
# lean forward, the offload and the decode loop while the model builds.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run13.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run13.log, pytest-cuda-run13.txt, e2e-*.log.jsonl, bench-13b-run13.json, headline-run13.json.
set -u -o pipefail
NAME=run13
BUDGET=${BUDGET:-590}
source bench/device/common.sh
cuda_tests 80 pytest-cuda-run13.txt tests/test_lora.py tests/test_offload.py tests/test_decode.py
ready
: "${PLAN:=e2e,sft:job:default@20,sft:unsloth:unsloth_lowmem+unsloth@10,sft:trl:trl_best@10,dpo:job:default,sft:job:lowmem8_offload@10,sft:seed:seed@6,dpo:trl:trl_best}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

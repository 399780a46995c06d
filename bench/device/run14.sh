#!/usr/bin/env bash
# Device call 14 of issue 13 (the session's last ~330 s of device time): DPO with the kept copy, the lean LoRA forward
# against PEFT's own in one process (run13's DPO, 5.90 pairs/s, was below run10's 6.27 on a slower host: is the lean
# forward's in-place GEMM slower there?), and a second sample of low memory with offloaded checkpoints (run13's
# deadline skipped it), last because of the ~1 GiB each paged-optimizer run leaves allocated. No tests.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run14.sh"   carry [".gpuw"]   timeout_s 320
set -u -o pipefail
NAME=run14
BUDGET=${BUDGET:-300}
source bench/device/common.sh
ready
: "${PLAN:=dpo:job:default,dpo:job:peft_lora,sft:job:lowmem8_offload@8}"
bench_run
at "bench exit $?"
at "done"
sleep 1

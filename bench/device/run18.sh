#!/usr/bin/env bash
# Device call 18 of issue 13 (the session's last ~250 s of device time): do larger DPO micro-batches pay now that they
# carry no padding? The job's DPO at its default (4 pairs x 4 per step) against 8 pairs x 2 (`dpo8`: the same
# pairs and gradient per step), both padding-free, checkpointing off and the copy kept, in one process. No tests.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run18.sh"   carry [".gpuw"]   timeout_s 240
set -u -o pipefail
NAME=run18
BUDGET=${BUDGET:-225}
source bench/device/common.sh
ready
: "${PLAN:=dpo:job:default,dpo:job:dpo8}"
bench_run
at "bench exit $?"
at "done"
sleep 1

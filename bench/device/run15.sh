#!/usr/bin/env bash
# Device call 15 of issue 13: padding-free DPO (job/padfree.py) against TRL's padded batches in one process, the seed's
# whole workload (its DPO stage now padding-free), and the job's SFT and low memory as a check of this host's speed.
# CUDA tests of padding-free DPO and packing while the model builds.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run15.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run15.log, pytest-cuda-run15.txt, e2e-*.log.jsonl, bench-13b-run15.json.
set -u -o pipefail
NAME=run15
BUDGET=${BUDGET:-585}
source bench/device/common.sh
cuda_tests 90 pytest-cuda-run15.txt tests/test_padfree.py tests/test_packing.py
ready
: "${PLAN:=dpo:job:default,dpo:job:padded,e2e,sft:job:default@16,sft:job:lowmem8_offload@10}"
bench_run
at "bench exit $?"
at "done"
sleep 1  # let tee write the last lines

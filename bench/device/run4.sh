#!/usr/bin/env bash
# Device call 4 of issue 13 (2026-12-03; one nvidia-h200, under 9 minutes): tests/test_dequantized.py on the GPU again (run2's
# CUDA-only tests failed on the test code: a CPU model after Liger's patch, a tokenizer without the job's prompt
# format), the seed's whole workload first in the process (the GPU to itself, as a real run has it), the job's
# default again (a second measurement of the headline figure), eight rows per micro-batch, the seed's row length at
# 4 and 16 rows per micro-batch, and DPO without the dequantized copy (same-process A/B against run2's default).
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run4.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run4.log, pytest-cuda-run4.txt, e2e-*.log.jsonl, bench-13b-run4.json, headline-run4.json.
set -u -o pipefail
NAME=run4
BUDGET=${BUDGET:-480}
source bench/device/common.sh
cuda_tests 150 pytest-cuda-run4.txt tests/test_dequantized.py
ready
: "${PLAN:=e2e,sft:job:default@20,sft:job:nogc_bs8@10,sft:job:len512@10,sft:job:len512_bs16@10,dpo:job:nodequant,dpo:job:default}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

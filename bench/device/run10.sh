#!/usr/bin/env bash
# Device call 10 of issue 13 (one nvidia-h200, under 10 minutes): run9 again at the final commit (the stage's exit
# without the interpreter's teardown, 1.7-2.0 s per stage in run9's logs, and decode's one side stream), with the
# CUDA tests that run8 failed on (tests/test_dequantized.py's GPU memory check) and test_decode.py's, in parallel
# with the model build. The seed recipe moves before low memory: with the tests first, the deadline would skip it.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run10.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run10.log, pytest-cuda-run10.txt, e2e-*.log.jsonl, bench-13b-run10.json, headline-run10.json.
set -u -o pipefail
NAME=run10
BUDGET=${BUDGET:-590}
source bench/device/common.sh
cuda_tests 80 pytest-cuda-run10.txt tests/test_dequantized.py tests/test_decode.py
ready
: "${PLAN:=e2e,sft:job:default@20,sft:unsloth:unsloth_lowmem+unsloth@10,sft:trl:trl_best@10,dpo:job:default,sft:seed:seed@6,sft:job:lowmem4@8,dpo:trl:trl_best}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

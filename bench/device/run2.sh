#!/usr/bin/env bash
# Device call 2 of issue 13 (one nvidia-h200, under 9 minutes): what run1 leaves out. tests/test_dequantized.py on
# the GPU (its generation test runs on CUDA only), then the job's DPO and low-memory figures, the seed's whole workload
# through `python -m job` (model load and the before/after generations included), stock TRL's DPO, Unsloth's
# low-memory mode, the seed recipe, then whatever fits. Same carry and output rules as run1.sh.
#
#   run: command  "BENCH_COMMIT=<short sha of the tree> bash bench/device/run2.sh"
#        carry    [".gpuw"]      timeout_s 600
#
# $OUT gets: run2.log, pytest-cuda-run2.txt, bench-13b-run2.json, headline-run2.json. headline.json is then made from
# several calls' files: bench/NOTES.md ("Measured") gives the command.
set -u -o pipefail
NAME=run2
source bench/device/common.sh
cuda_tests 150 pytest-cuda-run2.txt tests/test_dequantized.py
ready
: "${PLAN:=dpo:job:default,sft:job:lowmem4@8,e2e,dpo:trl:trl_best,sft:unsloth:unsloth_lowmem@10,sft:seed:seed@6,sft:job:nogc_bs8@10}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

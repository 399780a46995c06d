#!/usr/bin/env bash
# Device call 6 of issue 13 (one nvidia-h200, about 7 minutes): tests/test_dequantized.py on the GPU again (run5's
# OOM-ladder test failed on the test: on a GPU `auto` also merged the tiny model's micro-batches, and gave that back
# first), then the seed's whole workload twice: as run5 ran it (a second sample: run5 gave 151.4 s against the
# 150 s goal) and without the before/after generations (like for like with the 202 s baseline, measured
# before the generations existed).
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run6.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run6.log, pytest-cuda-run6.txt, e2e-*.log.jsonl, e2e-nogen-*.log.jsonl, bench-13b-run6.json, headline-run6.json.
set -u -o pipefail
NAME=run6
BUDGET=${BUDGET:-450}
source bench/device/common.sh
cuda_tests 120 pytest-cuda-run6.txt tests/test_dequantized.py
ready
: "${PLAN:=e2e,e2e_nogen}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

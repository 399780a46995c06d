#!/usr/bin/env bash
# Device call 7 of issue 13 (one nvidia-h200, about 3 minutes): tests/test_micro_batches.py on the GPU after its
# resume and multi-process tests were added (run5 ran the first five), and tests/test_packing.py again.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run7.sh"   carry [".gpuw"]   timeout_s 300
#
# $OUT gets: run7.log, pytest-cuda-run7.txt.
set -u -o pipefail
NAME=run7
BUDGET=${BUDGET:-240}
NO_MODEL=1
source bench/device/common.sh
cuda_tests 200 pytest-cuda-run7.txt tests/test_micro_batches.py tests/test_packing.py
at "done"
sleep 1  # let tee write the last lines

#!/usr/bin/env bash
# Device call 8 of issue 13 (one nvidia-h200, about 7 minutes): the before/after generations through job/decode.py
# (a static cache, one token's forward pass replayed from a CUDA graph). Its CUDA tests and the generation tests
# of tests/test_dequantized.py; then, on the 13B model, transformers' generate against the new loop (eager, and
# with the graph) side by side in one process (bench/generation.py: 8 prompts x 256 tokens, the "before" answers
# of the seed's SFT); then the seed's whole workload, which has paid 12-17 s for those answers.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run8.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run8.log, pytest-cuda-run8.txt, generation-run8.json, e2e-*.log.jsonl, bench-13b-run8.json,
# headline-run8.json.
set -u -o pipefail
NAME=run8
source bench/device/common.sh
cuda_tests 150 pytest-cuda-run8.txt tests/test_decode.py tests/test_dequantized.py tests/test_evaluate.py
ready
timeout 150 python3 bench/generation.py --model "$WORK/models/$SHAPE" --out "$OUT" --tag "$NAME" --repeats 1
at "generation bench exit $?"
: "${PLAN:=e2e}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

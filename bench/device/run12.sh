#!/usr/bin/env bash
# Device call 12 of issue 13 (one nvidia-h200): low memory with the checkpointed layers' inputs in pinned CPU memory
# (JOB_TRAIN__OFFLOAD_CHECKPOINTS, job/offload.py) at 8 and 4 rows per micro-batch, against low memory as before
# (lowmem4), in one process; the offload runs first, since each paged-optimizer run leaves ~1 GiB allocated behind it
# in the process (1203-run11's `left_allocated_gib`). With the CUDA tests of the offload and the lean LoRA forward
# while the model builds.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run12.sh"   carry [".gpuw"]   timeout_s 400
#
# $OUT gets: run12.log, pytest-cuda-run12.txt, bench-13b-run12.json.
set -u -o pipefail
NAME=run12
BUDGET=${BUDGET:-380}
source bench/device/common.sh
cuda_tests 100 pytest-cuda-run12.txt tests/test_offload.py tests/test_lora.py
ready
: "${PLAN:=sft:job:lowmem8_offload@8,sft:job:lowmem4@8,sft:job:lowmem4_offload@8}"
bench_run
at "bench exit $?"
python3 - "$OUT/bench-$SHAPE-$NAME.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    print(r.get("stage"), r.get("name"), {k: r.get(k) for k in ("steady_tokens_per_second", "tokens_per_second",
          "peak_gpu_memory_gib", "left_allocated_gib", "train_loss", "lean_lora_layers", "skipped", "error")
          if r.get(k) is not None}, (r.get("metrics") or {}).get("offloaded_checkpoints"))
PY
at "done"
sleep 1

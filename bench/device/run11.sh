#!/usr/bin/env bash
# Device call 11 of issue 13 (one nvidia-h200, under 10 minutes): what the lean LoRA forward (job/lora.py) buys, A/B in
# one process against PEFT's own forward (`_peft_lora`), at the default, at low memory (checkpointing: the recompute's
# early stop) and for DPO; low memory at 8 rows per micro-batch (`lowmem8`: does it fit 12 GiB?); the seed's workload
# last, if the deadline allows; with the CUDA tests of the lean forward, packing and the decode loop while the model
# builds.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run11.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run11.log, pytest-cuda-run11.txt, bench-13b-run11.json.
set -u -o pipefail
NAME=run11
BUDGET=${BUDGET:-585}
source bench/device/common.sh
cuda_tests 100 pytest-cuda-run11.txt tests/test_lora.py tests/test_packing.py tests/test_decode.py
ready
: "${PLAN:=sft:job:default@16,sft:job:peft_lora@16,sft:job:lowmem4_peft_lora@8,sft:job:lowmem4@8,sft:job:lowmem8@6,dpo:job:peft_lora,dpo:job:default,e2e}"
bench_run
at "bench exit $?"
python3 - "$OUT/bench-$SHAPE-$NAME.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    print(r.get("stage"), r.get("name"), {k: r.get(k) for k in ("steady_tokens_per_second", "tokens_per_second",
          "steady_pairs_per_second", "peak_gpu_memory_gib", "train_loss", "lean_lora_layers", "skipped", "error")
          if r.get(k) is not None})
PY
at "done"
sleep 1

#!/usr/bin/env bash
# Device call 1 of issue 13 (one nvidia-h200, under 9 minutes of command time): correctness on CUDA first, then the
# 13B SFT measurements that matter most, most valuable first. Every result is written as soon as it exists, so a
# timeout keeps what finished; runs the bench can't start before its deadline are recorded as skipped.
#
#   run: command  "BENCH_COMMIT=<short sha of the tree> bash bench/device/run1.sh"
#        carry    [".gpuw"]   (bench/device/wheels.sh builds it, ~42 MB)      timeout_s 600
#
# $OUT gets: run1.log (everything, Unsloth's process included), attn.json (bench/attn_check.py), pytest-cuda.txt
# (tests/test_attention.py, tests/test_packing.py and tests/test_dequantized.py on the GPU), bench-13b-run1.json (every run), headline-run1.json.
# Dry run of the plumbing on a CPU machine (minutes; the bench itself gets cut by the budget):
#   LOCAL=1 SHAPE=tiny OUT=/tmp/run1 BUDGET=420 BENCH_UNSLOTH_PYTHONPATH=$PWD/tests/fake_unsloth bash bench/device/run1.sh
set -u -o pipefail
NAME=run1
source bench/device/common.sh

# Correctness on CUDA before any timing: the kernel at the 13B attention shape (vs dense-mask SDPA, fp32 reference),
# then packed vs unpacked per-example losses through the job's own model loading and TRL's collator (tiny model).
timeout 120 python3 bench/attn_check.py --device "$DEVICE" --out "$OUT/attn.json"
at "attn_check exit $?"
cuda_tests 200 pytest-cuda.txt tests/test_attention.py tests/test_packing.py tests/test_dequantized.py
ready

# The benchmark, most valuable first: the job's default (varlen attention; checkpointing off and the 4-bit base
# dequantized once, both by `auto` on this card), the same without the copy (same-process A/B), the best peer (Unsloth,
# checkpointing off), stock TRL at its best, DPO, the job's low-memory setting, then eight rows per micro-batch (fewer
# micro-batches per step). The default runs 20 optimizer steps, half of the seed's SFT epoch (~40 steps of 16 packed
# rows), so that its whole-run figure weighs the warm-up against a run of realistic length. PLAN=... overrides.
: "${PLAN:=sft:job:default@20,sft:job:nodequant@10,sft:unsloth:unsloth@10,sft:trl:trl_best@10,dpo:job:default,sft:job:lowmem4@8,sft:job:nogc_bs8@10}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

#!/usr/bin/env bash
# Device call 5 of issue 13 (one nvidia-h200, under 9 minutes): after JOB_TRAIN__MERGE_MICRO_BATCHES=auto went into
# the job. The CUDA tests (packing, the dequantized copy's generation test, merged micro-batches), where a job
# process's first seconds go (imports), then the seed's whole workload first in the process (what a fresh pod sees),
# the job's default SFT (now 8 rows of 1,024 per micro-batch on this card) beside Unsloth and stock TRL in the same
# process, the job's DPO, then low memory if time is left.
#
#   run: command  "BENCH_COMMIT=<short sha> bash bench/device/run5.sh"   carry [".gpuw"]   timeout_s 600
#
# $OUT gets: run5.log, pytest-cuda-run5.txt, importtime-run5.txt, e2e-*.log.jsonl, bench-13b-run5.json, headline-run5.json.
set -u -o pipefail
NAME=run5
source bench/device/common.sh
cuda_tests 170 pytest-cuda-run5.txt tests/test_packing.py tests/test_dequantized.py tests/test_micro_batches.py
# A job process's fixed start-up: the imports every stage pays before its first log line (bytecode cached by now).
for i in 1 2; do
  /usr/bin/time -f "imports $i: %e s wall, %U s user" python3 -X importtime -c \
    "import job.pipeline, job.stages.sft, job.stages.dpo, trl, peft, bitsandbytes, datasets, liger_kernel" 2> /tmp/imp.txt
  tail -1 /tmp/imp.txt; sort -t'|' -k2 -n /tmp/imp.txt | tail -12 > "$OUT/importtime-run5-$i.txt"
done
python3 -c "import time; t=time.time(); import torch; a=time.time(); torch.zeros(1, device='cuda'); print(f'torch import {a-t:.1f}s, CUDA init {time.time()-a:.1f}s')"
at "start-up profile done"
ready
: "${PLAN:=e2e,sft:job:default@20,sft:unsloth:unsloth@10,sft:trl:trl_best@10,dpo:job:default,sft:job:lowmem4@8}"
bench_run
at "bench exit $?"
headline
at "done"
sleep 1  # let tee write the last lines

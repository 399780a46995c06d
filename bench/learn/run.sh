#!/usr/bin/env bash
# The GPU learnability run, as ONE device call: SFT of 256 made-up facts into a random-weight model of llm-jp-3-1.8b's
# shape (4-bit NF4, the job's defaults apart from epochs and learning rate), then DPO on the best SFT adapter, through
# `python -m job`. Results (<= 8 files) go to $OUT; commit them under bench/learn/results/.
#
#   here:   bench/device/wheels.sh          # builds .gpuw/ (the image lacks trl, bitsandbytes, ...)
#   device: command "BENCH_COMMIT=<git rev-parse --short HEAD> bash bench/learn/run.sh", carry [".gpuw"], timeout 600
#
# Extra arguments go to bench/learn/learn.py (e.g. --sft-lr 1e-3,2e-3 --sft-epochs 200).
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuw/common/*.whl .gpuw/job/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=${OUT:-/tmp/learn-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" 2>/dev/null || true
# learn.py stops SFT runs still going --sft-deadline-s after its start, DPO runs at --deadline-s, and writes what it
# has; that leaves the call's 600 s room for the install and the archive. Not measured yet: estimated 5-7 minutes
# from bench/results' 1.8B SFT throughput (~6.4k tokens per step, three runs sharing the GPU).
python3 bench/learn/learn.py --shape 1.8b --facts 256 --device cuda --work /tmp/learn --out "$out" \
  --sft-epochs 120 --sft-lr 5e-4,1e-3,2e-3 --dpo-epochs 3 --dpo-lr-scale 0.05,0.15,0.5 --sft-deadline-s 340 --deadline-s 480 "$@"

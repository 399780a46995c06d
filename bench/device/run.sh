#!/usr/bin/env bash
# One device call, parameterized (a new measurement is a new plan, not a new script). Everything is optional:
#   NAME     the call's tag: $OUT/NAME.log, $OUT/bench-SHAPE-NAME.json, $OUT/pytest-cuda-NAME.txt      (default: call)
#   TESTS    pytest arguments run on the GPU first, while the model builds                          (default: none)
#   PLAN     bench/bench.py's --plan on this tree                                                    (default: none)
#   BASE     a tree to measure the same plan on in the same call, for an A/B: a .tar.gz of `git archive <commit> job
#            bench` carried in; its results go to bench-SHAPE-NAME-base.json                         (default: none)
#   BASE_COMMIT the commit BASE was made from (recorded in its JSON); BASE_FIRST=1 measures BASE first.
#   BUDGETS  plans at several memory budgets in one call, `GIB=PLAN;GIB=PLAN...`: GIB is `full` (the whole card) or the
#            GiB a process should find free, which a holder process makes true by keeping the rest of the card
#            (torch.cuda.mem_get_info then reports what a smaller card would: capacity only, not its compute or
#            bandwidth); results in bench-SHAPE-NAME-GIB.json. Each segment gets a share of the time left in proportion
#            to its runs' expected lengths (weight() below)                                             (default: none)
#   RUN_S    seconds kept for the run in flight when the deadline passes                            (default: 80)
#   BUDGET, SHAPE, BENCH_COMMIT as in common.sh.
#
#   run: command  "BENCH_COMMIT=2a5bf78 NAME=r1 TESTS='tests/test_families.py' PLAN=sft:job:default@8 \
#                  BASE=.gpuw/base.tgz bash bench/device/run.sh"   carry [".gpuw"]   timeout_s 600
#   (git archive 92e1107 job bench | gzip > .gpuw/base.tgz, after bench/device/wheels.sh). Write BENCH_COMMIT out
#   (`git rev-parse --short HEAD` here): `$(git rev-parse ...)` inside the command runs on the device, whose copy of
#   .git is stale (it answered 92e1107 for 2a5bf78 on 2026-12-07).
#   Memory budgets, issue 24's call r24a (one H100; the 23 GiB segment was planned, not run: device time ran out):
#     BENCH_COMMIT=2a5bf78 NAME=r24a BUDGET=290 RUN_S=35 \
#       BUDGETS="full=dpo:job:default@5,dpo:job:p_keep_copy_4@5,sft:job:default@6,sft:job:p_keep_4@6;23=sft:job:default@6,..."
set -u -o pipefail
NAME=${NAME:-call}
source bench/device/common.sh
if [ -n "${TESTS:-}" ]; then
  # shellcheck disable=SC2086
  cuda_tests $(( $(left) / 3 )) "pytest-cuda-$NAME.txt" $TESTS
fi
base_run() {  # the same plan on the BASE tree, in a process of its own
  local base=/tmp/base hard=$(( $(left) - 8 ))
  mkdir -p "$base" && tar -xzf "$BASE" -C "$base"
  (cd "$base" && BENCH_COMMIT="${BASE_COMMIT:-base}" PYTHONPATH="/tmp/site:$base" timeout "$hard" python3 bench/bench.py run --shape "$SHAPE" --work "$WORK" \
    --out "$OUT" --tag "$NAME-base" --plan "$PLAN" --warmup-steps 2 --deadline-s $(( $(left) - 40 )))
  at "base bench exit $?"
}
if [ -n "${PLAN:-}" ]; then
  ready
  # BASE_FIRST=1 swaps the order, so that two calls show what the order (a cold GPU, the page cache) does to an A/B.
  if [ -n "${BASE:-}" ] && [ "${BASE_FIRST:-0}" = 1 ]; then base_run; fi
  bench_run
  at "bench exit $?"  # 124: BUDGET's hard limit stopped it (the run in flight is lost; finished ones are in its JSON)
  if [ -n "${BASE:-}" ] && [ "${BASE_FIRST:-0}" != 1 ]; then base_run; fi
fi
hold() {  # hold GIB: keep all but GIB of the card in a process of its own, until `unhold`
  python3 -c "
import time, torch
free = torch.cuda.mem_get_info()[0]
x = torch.empty(max(0, free - int($1 * 2**30)), dtype=torch.uint8, device='cuda')
print(f'holder: {x.numel() / 2**30:.1f} GiB held, {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free', flush=True)
time.sleep(3600)" > /tmp/holder.log 2>&1 &
  holder=$!
  for _ in $(seq 60); do grep -q "GiB free" /tmp/holder.log && break; sleep 1; done
  cat /tmp/holder.log
}
unhold() { kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null; sleep 2; }
if [ -n "${BUDGETS:-}" ]; then
  ready
  IFS=';' read -r -a segments <<< "$BUDGETS"
  weight() {  # a segment's share of the time left, in units of about 17 s of a 13B run on an H100 (r24a, run16): a job
    # run 2 on the whole card and 3 under a memory budget (checkpointing), stock TRL 3, Unsloth 4 (its own process; 6 for
    # sft+dpo, one import for both stages), e2e 10
    local w=0 item job=2
    [ "${1%%=*}" = full ] || job=3
    IFS=',' read -r -a items <<< "${1#*=}"
    for item in "${items[@]}"; do
      case $item in e2e*) w=$((w + 10));; sft+dpo:unsloth:*) w=$((w + 6));; *:unsloth:*) w=$((w + 4));; *:trl:*) w=$((w + 3));; *) w=$((w + job));; esac
    done
    echo "$w"
  }
  total=0
  for seg in "${segments[@]}"; do total=$(( total + $(weight "$seg") )); done
  for seg in "${segments[@]}"; do
    gib=${seg%%=*} PLAN=${seg#*=} base_name=$NAME w=$(weight "$seg")
    [ "$gib" = full ] || hold "$gib"
    SEG_S=$(( $(left) * w / total )) NAME="$base_name-$gib" bench_run
    rc=$?  # 124: the segment's hard limit stopped the bench (a run in flight is lost; finished ones are in its JSON)
    total=$(( total - w ))
    at "bench $gib exit $rc"
    [ "$gib" = full ] || unhold
    NAME=$base_name
  done
fi
at "done"
sleep 1  # let tee write the last lines

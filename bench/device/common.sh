# Sourced by bench/device/run.sh: output, time budget, packages and the model, the same way in every device call.
#   NAME=call source bench/device/common.sh     then: left (seconds of budget left), $WORK, $SHAPE, $DEVICE, $build
# LOCAL=1: a dry run on a CPU machine in a prepared environment (no wheels; use SHAPE=tiny).
: "${OUT:=/tmp/out}"
mkdir -p "$OUT"
BUDGET=${BUDGET:-530}  # seconds of command time for the whole call (the device limit is 600 per call)
t0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - t0))); }
at() { echo "$NAME: $* at $(( $(date +%s) - t0 ))s"; }
exec > >(tee -a "$OUT/$NAME.log") 2>&1
echo "$NAME: commit ${BENCH_COMMIT:-unknown}, $(date -u +%FT%TZ), budget ${BUDGET}s"
SHAPE=${SHAPE:-13b}
DEVICE=cuda
WORK=/tmp/qb
if [ "${LOCAL:-0}" = 1 ]; then  # the dry run: this machine's environment as it is
  DEVICE=cpu WORK=$OUT/work
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  true & usite=$!
else
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  # Packages: the job's set now; Unsloth's own set in the background (needed minutes later, never on our path).
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pipi /tmp/site .gpuw/common/*.whl .gpuw/job/*.whl || { echo "$NAME: job wheels did not install"; exit 1; }
  (pipi /tmp/usite .gpuw/common/*.whl .gpuw/unsloth/*.whl && echo "unsloth env ok") > /tmp/usite.log 2>&1 &
  usite=$!
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export BENCH_UNSLOTH_PYTHONPATH=/tmp/usite
fi
at "packages installed"
# The random-weight model (llm-jp-3-13b's shape: ~50 s on the H200) builds in the background; `wait $build` before use.
# NO_MODEL=1: a call that runs tests only.
if [ "${NO_MODEL:-0}" = 1 ]; then true & build=$!; else
python3 -c "import sys, pathlib; sys.path.insert(0, 'bench'); import synth; synth.build_model(pathlib.Path('$WORK/models/$SHAPE'), '$SHAPE', device='$DEVICE')" \
  > /tmp/build.log 2>&1 &
build=$!
fi
ready() {  # the model and Unsloth's environment
  wait "$build" || { echo "$NAME: model build failed"; cat /tmp/build.log; }
  wait "$usite"; cat /tmp/usite.log 2>/dev/null
  at "model and environments ready"
}
cuda_tests() {  # cuda_tests SECONDS OUTFILE TESTFILE...: pytest on this machine's GPU, its output in $OUT/OUTFILE
  local limit=$1 file=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rA "$@" > "$OUT/$file" 2>&1
  at "pytest exit $?"; tail -3 "$OUT/$file"
}
bench_run() {  # the benchmark with $PLAN, stopped before the budget ends (or $SEG_S seconds, a share of it); runs it
  # can't start are recorded as skipped
  local budget=${SEG_S:-$(left)}
  local hard=$(( budget - 8 ))
  [ "$hard" -ge 60 ] || hard=60
  timeout "$hard" python3 bench/bench.py run --shape "$SHAPE" --work "$WORK" --out "$OUT" --tag "$NAME" --plan "$PLAN" \
    --warmup-steps 2 --deadline-s $(( budget - ${RUN_S:-80} ))
}
headline() {  # print the goals of a result file's headline
  python3 bench/bench.py headline "$OUT/bench-$SHAPE-$NAME.json" --out "$OUT/headline-$NAME.json" && python3 -c \
    "import json; h=json.load(open('$OUT/headline-$NAME.json')); [print(f'  {k}: {v}') for k, v in h['goals'].items()]"
}

# shellcheck shell=sh
# Run by /bin/sh in each pod of the Indexed Job (mounted from the qlora-sweep-grid ConfigMap).
# Picks this pod's line of the grid, makes the run id <job name>-<index> and starts the job with that line's
# settings. JOB_COMPLETION_INDEX is set by the Job controller; it is not a job setting, so it is removed from the
# job's environment.
set -eu
grid="${QLORA_SWEEP_GRID:-/etc/qlora-sweep/grid.txt}"
index="${JOB_COMPLETION_INDEX:?not an Indexed Job}"
line="$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$grid" | sed -n "$((index + 1))p")"
if [ -z "$line" ]; then
    echo "sweep: no line for completion index $index in grid.txt" >&2
    exit 2  # job.exitcodes.ExitCode.CONFIG: fails this index at once
fi
echo "sweep: index $index: $line" >&2
# shellcheck disable=SC2086  # word splitting of $line is the point: one NAME=VALUE per word
exec env -u JOB_COMPLETION_INDEX JOB_RUN_ID="${JOB_RUN_ID}-${index}" $line python -m job

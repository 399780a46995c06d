#!/bin/sh
# Entrypoint of the qlora-job image (PID 1 is tini, which passes signals on). It checks the writable directories and
# then `exec`s, so that the job itself receives SIGTERM (it saves a checkpoint and exits 143).
#
#   (no arguments)                     run the stage set by JOB_*: one process, or one per visible GPU (torchrun)
#   --help | --print-config | --check | demo [DIR]    passed to `python -m job` as given, in one process
#   any other command (bash, python, ...)             run as it is
#
# NPROC_PER_NODE sets the number of processes (default: the number of GPUs visible to the container).
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: seconds torchrun gives its processes to stop after SIGTERM (default here 120).
set -eu

case "${1:-}" in
    -h | --help | --print-config) exec python -m job "$@" ;;
    "" | -* | demo) ;;
    *) exec "$@" ;;
esac

# On a read-only root filesystem these must be volumes or tmpfs mounts (the image declares them as volumes).
for dir in "${TMPDIR:-/tmp}" "${HF_HOME:-$HOME/.cache/huggingface}" "${JOB_WORKDIR:-/tmp/qlora-job}"; do
    mkdir -p "$dir" 2>/dev/null || true
    if [ ! -w "$dir" ]; then
        echo "entrypoint: $dir is not writable by uid $(id -u); mount a volume or tmpfs there that this user can write" \
             "(e.g. --tmpfs $dir or -v NAME:$dir)" >&2
        exit 2 # ExitCode.CONFIG
    fi
done

# Triton (Liger's kernels, on GPUs) loads the kernels it compiles from its cache, by default under HOME (/tmp).
if [ -z "${TRITON_CACHE_DIR:-}" ] && awk -v d="${HOME:-/tmp}" '$2 == d && $4 ~ /(^|,)noexec(,|$)/ { f = 1 } END { exit !f }' /proc/mounts 2>/dev/null; then
    echo "entrypoint: warning: ${HOME:-/tmp} is mounted noexec, so GPU kernels compiled by Triton cannot load;" \
         "mount it with exec (e.g. --tmpfs /tmp:exec) or set TRITON_CACHE_DIR to a directory that allows it" >&2
fi

if [ "$#" -gt 0 ]; then
    exec python -m job "$@"
fi

# The GPUs this container may use, as torch would count them (CUDA_VISIBLE_DEVICES included), from NVML without
# importing torch (2-3 s at every start; gpus.py).
nproc=${NPROC_PER_NODE:-$(python "$(dirname "$0")/gpus.py" 2>/dev/null || echo 0)}
case "$nproc" in
    '' | *[!0-9]*)
        echo "entrypoint: NPROC_PER_NODE must be a whole number, not '$nproc'" >&2
        exit 2 # ExitCode.CONFIG
        ;;
esac

if [ "$nproc" -gt 1 ]; then
    echo "entrypoint: $nproc GPUs, starting one process per GPU (torchrun --standalone --nproc-per-node=$nproc)" >&2
    exec python "$(dirname "$0")/launch.py" --standalone --nproc-per-node="$nproc" -m job
fi
exec python -m job

"""Exit codes of `qlora-job`: the one definition that the README, the Kubernetes manifests and the tests use.

Two families matter to whoever retries a run:
- PERMANENT: the same inputs will fail again (bad config, bad data, a model that can't be loaded, out of memory,
  training that diverged);
  a Kubernetes Job fails at once on these (podFailurePolicy action FailJob).
- RETRYABLE: the environment failed (storage or network error, the pod was asked to stop); a retry with the same
  run id continues from the last uploaded checkpoint.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: An unexpected error (a bug): retried up to the Job's backoffLimit.
    INTERNAL = 1
    #: Invalid or unknown JOB_ variable, or bad command-line arguments.
    CONFIG = 2
    #: Training or eval data missing, unreadable or malformed (the message names file and row).
    DATA = 3
    #: The base model or adapter can't be used (not found, no safetensors weights, remote code not allowed, mismatch).
    MODEL = 4
    #: Out of GPU memory with this configuration: lower the batch size or max length.
    OOM = 5
    #: Training diverged: a loss, gradient norm or adapter weight became NaN or infinite (the message names the step);
    #: lower JOB_TRAIN__LEARNING_RATE. The last good checkpoint is kept; nothing is marked successful.
    DIVERGED = 6
    #: The pod's own disk failed: JOB_WORKDIR or a local JOB_OUTPUT full, read-only or giving I/O errors (the message
    #: names the path, the variable and the free space). Retryable: a new pod gets a fresh ephemeral disk and resumes
    #: from the last uploaded checkpoint (local checkpoints are pruned, so a run's need stays about one checkpoint);
    #: a volume that is simply too small fails backoffLimit times, each with this message.
    LOCAL_STORAGE = 74  # EX_IOERR
    #: Storage or network failure after the client's own retries (S3, Hugging Face Hub): retry.
    TRANSIENT = 75  # EX_TEMPFAIL
    #: Stopped by SIGINT (Ctrl-C); a checkpoint was uploaded if training had started: rerun to continue.
    INTERRUPTED = 130  # 128 + SIGINT
    #: Stopped by SIGTERM (spot reclaim, node drain); a checkpoint was uploaded if training had started: retry.
    PREEMPTED = 143  # 128 + SIGTERM, what a killed process would report anyway


PERMANENT = frozenset({ExitCode.CONFIG, ExitCode.DATA, ExitCode.MODEL, ExitCode.OOM, ExitCode.DIVERGED})
RETRYABLE = frozenset({ExitCode.LOCAL_STORAGE, ExitCode.TRANSIENT, ExitCode.INTERRUPTED, ExitCode.PREEMPTED})

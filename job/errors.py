"""Errors that end a run with a specific exit code (see job/exitcodes.py). Messages are for users: they name the
variable, file and row, and never contain a secret."""

from job.exitcodes import ExitCode


class JobError(Exception):
    exit_code = ExitCode.INTERNAL


class ConfigError(JobError):
    """Invalid configuration; the message names every bad variable."""

    exit_code = ExitCode.CONFIG


class DataError(JobError):
    """Unreadable or malformed data; the message names the file, the row and the problem."""

    exit_code = ExitCode.DATA


class ModelError(JobError):
    """The base model or adapter can't be used."""

    exit_code = ExitCode.MODEL


class OutOfMemory(JobError):
    """Out of GPU memory with this configuration; the message names the settings to lower."""

    exit_code = ExitCode.OOM


class Diverged(JobError):
    """A non-finite loss, gradient norm or adapter weight during training; the message names the step."""

    exit_code = ExitCode.DIVERGED


class TransientError(JobError):
    """Storage or network failed after the clients' own retries; running again may succeed."""

    exit_code = ExitCode.TRANSIENT


class Preempted(JobError):
    """SIGTERM/SIGINT: the pod is being stopped. A checkpoint was uploaded if training had started.
    Exit 143 for SIGTERM, 130 for SIGINT (Ctrl-C), as a process killed by the signal would report."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self):  # type: ignore[override]
        return ExitCode.INTERRUPTED if self.signal_name == "SIGINT" else ExitCode.PREEMPTED

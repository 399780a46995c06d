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


class LocalStorageError(JobError):
    """The pod's own disk failed (full, read-only, I/O error); the message names the path, the variable and the free
    space. A new pod gets a fresh disk: retryable."""

    exit_code = ExitCode.LOCAL_STORAGE


#: errno values that mean the local disk, not the job, failed.
DISK_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG"})
#: What libraries that swallow the errno say instead: torch.save ("unexpected pos 45504 vs 45392", "file write
#: failed"), safetensors ("No space left on device (os error 28)").
_DISK_WORDS = ("unexpected pos", "file write failed", "No space left on device", "os error 28", "Disk quota exceeded")


def local_storage_error(exc: BaseException, paths: dict[str, str]) -> LocalStorageError | None:
    """`exc` (or an exception it came from) as a LocalStorageError when the local disk failed, else None. `paths`:
    variable -> local directory (JOB_WORKDIR, a local JOB_OUTPUT): the one holding the failed path is named, with
    its volume's free space."""
    import errno
    import os
    import shutil

    seen = exc
    filename, reason = None, None
    while seen is not None and reason is None:
        if isinstance(seen, shutil.Error) and seen.args and isinstance(seen.args[0], list) and seen.args[0]:
            _, dest, why = seen.args[0][0]  # copytree's (source, destination, why) per file that failed
            if any(w in str(why) for w in _DISK_WORDS):
                filename, reason = dest, str(why).split("] ", 1)[-1].split(":", 1)[0]
        elif isinstance(seen, OSError) and seen.errno and errno.errorcode.get(seen.errno) in DISK_ERRNOS:
            filename, reason = seen.filename, seen.strerror or str(seen)
        elif any(w in str(seen) for w in _DISK_WORDS):
            reason = " ".join(str(seen).split())[:200]
        seen = seen.__cause__ or seen.__context__
    if reason is None:
        return None
    where = [(var, p) for var, p in paths.items() if p and filename and path_inside(str(filename), p)]
    var, root = where[0] if where else (None, None)
    if var is None and not filename:  # a library's message without the path: the scratch directory writes the most
        var, root = next(iter(paths.items()), (None, None))
    free = ""
    if root:
        try:
            free = f"; {shutil.disk_usage(root if os.path.exists(root) else os.path.dirname(root)).free / 2**20:.0f} MiB free there"
        except OSError:
            pass
    what = f"{filename}: " if filename else ""
    named = f"{var}={root}: " if var else ""
    return LocalStorageError(f"{named}{what}can't write to the local disk ({reason}){free}. Give {var or 'the job'} a "
                             "larger or healthy volume (an emptyDir or PVC in Kubernetes); a retry with the same "
                             "JOB_RUN_ID resumes from the last uploaded checkpoint")


def path_inside(path: str, root: str) -> bool:
    import os

    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

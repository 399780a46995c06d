"""One run per run id at a time: the run lock.

Two runs started with the same JOB_RUN_ID (a Job applied twice, a manual rerun while the pod still runs) would both
train and both publish, each overwriting the other's checkpoints and outputs. The first one holds a lock beside the
run's outputs, `{JOB_OUTPUT}/{run_id}.lock` (beside, not inside: JOB_RESTART=true empties the run's folder); the second
one exits 2 naming JOB_RUN_ID while the first is alive.

- S3: an object created with a conditional write (`If-None-Match: *`) and refreshed by a heartbeat every third of
  JOB_LOCK_TTL (`If-Match` on its own ETag). A run that died (kill -9, a lost node) stops refreshing it: its lock is
  taken over once it is JOB_LOCK_TTL seconds old by the server's clock. A later attempt of the same Kubernetes Job
  (same JOB_ATTEMPT_GROUP: the manifests set it to the Job's uid) takes it over at once: attempts of one Job never
  overlap (podReplacementPolicy: Failed), so the holder is a dead predecessor.
- Local (and mounted) directories: an advisory `flock` on the lock file, released by the kernel when its process ends;
  the file is removed at the end.
- hf://: the Hub has no conditional writes on files; its commits are atomic and the run's outputs are one commit, so
  two runs end as two commits, the later one winning. No lock (a log line says so).

    >>> with hold(settings, "my-run", token=None) as lock:   # ConfigError (exit 2) if another run holds it
    ...     lock.check()                                    # before publishing: still ours?
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone

from job import storage
from job.errors import DISK_ERRNOS, ConfigError, DataError, JobError

log = logging.getLogger(__name__)


class _NoLock:
    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def _holder(s) -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "group": s.attempt_group,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ttl": s.lock_ttl}


def _busy(run_id: str, where: str, holder: dict, age: float | None, ttl: int) -> ConfigError:
    who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "started") if holder.get(k))
    refreshed = f", refreshed {age:.0f} s ago" if age is not None else ""
    expiry = (f" A lock whose run died expires {ttl} s after its last refresh (JOB_LOCK_TTL)." if age is not None
              else " The lock ends with its process.")
    return ConfigError(f"JOB_RUN_ID={run_id}: another run with this run id is in progress ({where}: {who or 'unknown'}"
                       f"{refreshed}); two runs of one id would both train and both publish. Wait for it to finish, "
                       f"or use another JOB_RUN_ID.{expiry}")


class _LocalLock:
    def __init__(self, path, run_id: str, s):
        self.path, self.run_id, self.s, self.file = path, run_id, s, None
        self.made: list = []  # folders made for the lock alone: removed with it when nothing else came into them

    def acquire(self) -> None:
        import fcntl

        missing = [d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()]
        self.made = missing  # deepest first
        for _ in range(3):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's life
            except OSError as exc:
                if errno.errorcode.get(exc.errno) in DISK_ERRNOS:
                    raise  # the disk's problem: exit 74 (job/__main__.py)
                raise ConfigError(f"JOB_OUTPUT: {self.s.output}: can't write {self.path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    holder = json.loads(f.read() or "{}")
                except ValueError:
                    holder = {}
                f.close()
                raise _busy(self.run_id, str(self.path), holder, None, self.s.lock_ttl) from None
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # locked a file its holder removed as it ended: lock the current one
        else:
            raise ConfigError(f"JOB_RUN_ID={self.run_id}: could not take the run lock {self.path}: it changed hands "
                              "three times meanwhile; another run with this run id is starting")
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder(self.s)) + "\n")
        f.flush()
        self.file = f

    def check(self) -> None:
        pass

    def release(self) -> None:
        if self.file is not None:
            # Removed while still locked: a run that opened it meanwhile sees that it was removed and takes the new one.
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.file.close()  # closing drops the flock
            self.file = None
            for folder in self.made:  # a run that failed before writing anything leaves no empty JOB_OUTPUT behind
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty


class _S3Lock:
    def __init__(self, uri: storage.S3Uri, run_id: str, s):
        self.uri, self.run_id, self.s = uri, run_id, s
        self.holder = _holder(s)
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "refreshed": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    def acquire(self) -> None:
        for _ in range(3):  # a lock released between our two calls: try again
            self.etag = storage.s3_create_or_replace(self.uri, self._body())
            if self.etag:
                break
            seen = storage.s3_read_with_age(self.uri)
            if seen is None:
                continue
            raw, etag, age = seen
            try:
                holder = json.loads(raw or b"{}")
            except ValueError:
                holder = {}
            ttl = int(holder.get("ttl") or self.s.lock_ttl)
            predecessor = bool(self.s.attempt_group) and holder.get("group") == self.s.attempt_group
            if age < ttl and not predecessor:
                raise _busy(self.run_id, str(self.uri), holder, age, ttl)
            self.etag = storage.s3_create_or_replace(self.uri, self._body(), etag=etag)
            if self.etag is None:  # another run took it over first
                raise _busy(self.run_id, str(self.uri), holder, age, ttl)
            log.warning("run lock %s taken over from %s (%s)", self.uri, holder.get("host", "an unknown host"),
                        "an earlier attempt of this Job" if predecessor else f"not refreshed for {age:.0f} s")
            break
        if not self.etag:
            raise ConfigError(f"JOB_RUN_ID={self.run_id}: could not take the run lock {self.uri}: it changed hands "
                              "three times meanwhile; another run with this run id is starting")
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        every = max(1.0, self.s.lock_ttl / 3)
        while not self._stop.wait(every):
            try:
                with self._mutex:
                    if self._stop.is_set():
                        return
                    etag = storage.s3_create_or_replace(self.uri, self._body(), etag=self.etag)
                    if etag is None:
                        self.lost = True
                        log.error("run lock %s was taken over by another run (this one did not refresh it for %d s)",
                                  self.uri, self.s.lock_ttl)
                        return
                    self.etag = etag
            except Exception as exc:  # noqa: BLE001 - a failed refresh is retried at the next beat
                log.warning("run lock %s not refreshed: %s", self.uri, exc)

    def check(self) -> None:
        if self.lost:
            raise ConfigError(f"JOB_RUN_ID={self.run_id}: this run lost its lock {self.uri} to another run with the same "
                              "run id (its heartbeat failed for longer than JOB_LOCK_TTL); not publishing over it")

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if self.etag and not self.lost:
                with contextlib.suppress(Exception):  # best effort: an unreleased lock expires
                    seen = storage.s3_read_with_age(self.uri)
                    if seen and seen[1] == self.etag:
                        storage.s3_delete_object(self.uri)
            self.etag = None


@contextlib.contextmanager
def hold(s, run_id: str, *, main: bool = True):
    """Hold the run lock for `run_id` under JOB_OUTPUT while the block runs (only the process that uploads: `main`)."""
    output = storage.parse_uri(s.output)
    if not main or isinstance(output, storage.HfUri):
        if main:
            log.info("no run lock on hf:// outputs: a concurrent run with this run id would publish its own commit")
        yield _NoLock()
        return
    uri = output.join(f"{run_id}.lock")
    lock = _LocalLock(uri.path, run_id, s) if isinstance(uri, storage.LocalUri) else _S3Lock(uri, run_id, s)
    try:
        lock.acquire()
    except JobError as exc:
        if str(exc).startswith(("JOB_RUN_ID", "JOB_OUTPUT")):
            raise
        # S3's own answers (no such bucket, access denied, unreachable): about JOB_OUTPUT and the run (the lock is
        # its first write), with their exit codes.
        message = f"JOB_OUTPUT: {str(exc).replace(str(uri), str(output.join(run_id)))}"
        error = ConfigError(message) if isinstance(exc, DataError) else exc
        error.args = (message,)
        raise error from None
    try:
        yield lock
    finally:
        lock.release()

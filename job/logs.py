"""Logging: readable text with a progress bar on a terminal, one JSON object per line otherwise (k8s, CI logs).
Every record passes a filter that replaces the values of secret variables (HF_TOKEN, AWS keys) with '***'."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import datetime, timezone

_secrets: list[str] = []


def redact(text: str) -> str:
    for value in _secrets:
        text = text.replace(value, "***")
    return text


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


class _Handler(logging.StreamHandler):
    """A stream handler that lets the job's own errors through: logging swallows whatever `emit` raises (it prints
    "--- Logging error ---" and goes on), so a SIGTERM whose Preempted was raised inside a log call was lost and the
    run went on to exit 0."""

    def handleError(self, record: logging.LogRecord) -> None:
        from job.errors import JobError

        if isinstance(sys.exc_info()[1], JobError):
            raise  # noqa: PLE0704 - called from emit's except block: the exception being handled
        super().handleError(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


#: Library messages that say nothing a user of this job can act on: (logger, start of the message, why).
NOISE = (
    # At bitsandbytes' import on CPUs with AVX512-BF16: an optional CPU inference kernel from the Hub's `kernels`
    # package is missing. bitsandbytes falls back to its own kernel, and the job's CPU path (the demo, tests) keeps
    # the 4-bit layout that kernel would repack anyway (job.model.keep_4bit_layout).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward", "optional CPU kernel"),
    # At liger-kernel's import on GPUs (twice per process in the 13B runs' stage logs, e.g. `git show
    # 2121a1e:bench/results/e2e-sft-1204-run16.log.jsonl`): its alternative backends for other hardware (CuTe DSL,
    # Ascend NPUs) are missing; it uses its Triton kernels, which the job measured.
    ("liger_kernel.backends.registry", "Backend impl ", "optional backends for other hardware"),
)


class _DropNoise(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_noise() -> None:
    """Filter NOISE where it is logged (a logger's filters see only its own records, so this must run before the
    library logs; bitsandbytes logs at import)."""
    for name, prefix, _ in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNoise(prefix))


def use_json(log_format: str) -> bool:
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def setup(log_format: str, secrets: list[str], libraries: bool = True) -> bool:
    """Configure the root logger; returns True when logs are JSON lines (no progress bar). `libraries`: also route
    transformers' and datasets' logs through it (`route_libraries`: imports them, which the command line leaves to
    the preflight, once the settings and data are checked)."""
    global _secrets, _as_json, _configured
    _secrets = sorted(set(secrets), key=len, reverse=True)
    as_json = _as_json = use_json(log_format)
    _configured = True
    handler = _Handler(sys.stderr)
    handler.addFilter(_RedactFilter())
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Deprecations inside the libraries are theirs to fix, not the user's: keep them out of the job's logs.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.captureWarnings(True)  # library warnings become log records: same format, same redaction
    drop_noise()
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if libraries:
        route_libraries()
    return as_json


_as_json = False
_configured = False  # setup() ran: this process's logging is the job's (not a library user's, or a test's)


def route_libraries() -> None:
    """Route transformers' and datasets' logs through the root logger's handler (and its redaction), and keep their
    progress bars off in JSON mode; nothing unless `setup` configured this process's logging. Imports both (about
    2 s on 2 CPU cores)."""
    if not _configured:
        return
    import transformers
    import datasets

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()
    if _as_json:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

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


def use_json(log_format: str) -> bool:
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def setup(log_format: str, secrets: list[str]) -> bool:
    """Configure the root logger; returns True when logs are JSON lines (no progress bar)."""
    global _secrets
    _secrets = sorted(set(secrets), key=len, reverse=True)
    as_json = use_json(log_format)
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
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers
    import datasets

    # Route library logs through our handler (and its redaction), and keep their progress bars off in JSON mode.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()
    if as_json:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return as_json

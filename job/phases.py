"""Where a run's wall time goes: seconds per phase, from the interpreter's start to the upload.

`mark(name)` ends the phase `name` at this moment (the phase began at the previous mark, or at the process's start
for the first). `seconds()` gives every phase so far, in order, and `run.json` (`phases_s`) and the run's last log
line (`event: done`) carry them, so that what a stage spends before its first step (imports, checks, download, load,
the trainer's set-up, the "before" answers) is measured on every run, not guessed.

    imports          the interpreter's start to the job's first line of work (Python, pydantic, boto3: not the
                     training stack, which comes once the checks that need none of it have passed)
    checks           storage probes, the data pulled and checked row by row, the eval prompts (job/preflight.py)
    libraries        the training stack's import: torch, transformers, PEFT, TRL, bitsandbytes (10-20 s)
    preflight        the settings TRL and PEFT check, the model's small files and modules, tokenizer, lengths,
                     run identity, memory plan (job/preflight.py)
    weights          the base model's download (none when cached or local)
    load             a resume checkpoint's download, then the 4-bit base (and JOB_ADAPTER) onto the device
    trainer          the trainer's set-up: memory plan, dequantized copy, data collation, optimizer
    before           the starting model's answers to the eval prompts
    first_step       train() up to the end of the first optimizer step (resume checkpoint, kernels' first compiles)
    train            the other steps
    after            evaluation and the trained adapter's answers
    write            adapter, metrics, report files
    publish          the upload (only in the log line: run.json is uploaded in it)

A phase a run does not reach is absent; a retried attempt (out of memory) adds its time to the phases it repeats.
"""

from __future__ import annotations

import os
import time

_marks: list[tuple[str, float]] = []


def _process_start() -> float:
    """This process's start on time.monotonic()'s clock (Linux: /proc; elsewhere the job's first import)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic()


_START = _process_start()


def begin() -> None:
    """A run starts: its phases from now on (the first run of a process keeps its start, for `imports`)."""
    global _START
    if _marks:  # an earlier run in this process (tests, the demo): this one starts now
        _marks.clear()
        _START = time.monotonic()


def mark(name: str) -> None:
    """End phase `name` now."""
    _marks.append((name, time.monotonic()))


def seconds() -> dict[str, float]:
    """{phase: seconds}, in order; a phase marked twice (a retried attempt) sums."""
    out: dict[str, float] = {}
    last = _START
    for name, t in _marks:
        out[name] = round(out.get(name, 0.0) + t - last, 2)
        last = t
    return out


def first_step_callback():
    """A TrainerCallback that marks `first_step` at the end of the first optimizer step of train()."""
    from transformers import TrainerCallback

    class _FirstStep(TrainerCallback):
        done = False

        def on_step_end(self, args, state, control, **kw):
            if not self.done:
                self.done = True
                mark("first_step")

    return _FirstStep()

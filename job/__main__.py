"""Command line: `python -m job` (or `qlora-job`).

    qlora-job                  run the stage configured by JOB_* variables
    qlora-job --check          every check a run makes before downloading weights (config, storage, data, model,
                               run identity, EOS, length policy), and what the run would do; downloads data and
                               the model's small files only
    qlora-job --print-config   print the resolved configuration, secrets masked
    qlora-job demo [DIR]       SFT then DPO of a tiny model on built-in data, on CPU, in under a minute

Exit codes: see job/exitcodes.py (0 ok, 1 internal, 2 config, 3 data, 4 model, 5 GPU OOM, 6 diverged, 74 local disk,
75 transient, 130 interrupted, 143 stopped).
"""

from __future__ import annotations

import signal
import sys


def _stop_early(signum, frame):
    # Ctrl-C or SIGTERM while the libraries are still importing: stop quietly with the signal's code, no traceback.
    # (Replaced by job.signals.StopSignal once the job is running.)
    print(f"qlora-job: {signal.Signals(signum).name} received before the job started; stopping", file=sys.stderr)
    raise SystemExit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _stop_early)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from job.errors import JobError, local_storage_error  # noqa: E402
from job.exitcodes import ExitCode  # noqa: E402

log = logging.getLogger("job")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora-job",
        description="Fine-tune an LLM with 4-bit QLoRA (one SFT or DPO stage), configured by JOB_* environment variables.",
        epilog="Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode) + ". See README.md for every variable.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="run every check a run makes before downloading weights, and print what it would do")
    mode.add_argument("--print-config", action="store_true", help="print the resolved configuration (secrets masked) and exit")
    p.add_argument("command", nargs="?", choices=["demo"], help="demo: run SFT then DPO on a tiny built-in model and data (CPU)")
    p.add_argument("demo_dir", nargs="?", default="qlora-demo", help="where the demo writes its model, data and outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from job import logs
    from job.settings import load_settings, secret_values

    # Before anything imports the training stack: its noise filters must be in place when bitsandbytes logs at its
    # import. Only the demo imports it here: a run and --check import it once the settings, storage and data are
    # checked (torch, transformers, TRL: 10+ s of imports on 2 CPU cores), --print-config never.
    logs.setup("auto", secret_values(), libraries=args.command == "demo")
    settings = None
    try:
        if args.print_config:
            print(json.dumps(load_settings(trl=False).masked(), ensure_ascii=False, indent=2))
            return ExitCode.OK
        from job.signals import StopSignal

        stop = StopSignal()
        stop.install()  # from here on a signal raises Preempted (exit 143/130) until training starts
        if args.command == "demo":
            from job.demo import run_demo

            return run_demo(args.demo_dir)
        # TRL's and PEFT's checks of the settings come once the storage and data are checked (job/preflight.py
        # `libraries`): the training stack's imports take 10-20 s, and those are the most common mistakes.
        settings = load_settings(trl="later")
        # Library logs are routed by the preflight, with their import (job/preflight.py `libraries`).
        progress_bar = not logs.setup(settings.log_format, secret_values(), libraries=False)
        from job import pipeline

        if args.check:
            print(json.dumps(pipeline.check(settings), ensure_ascii=False, indent=2))
            return ExitCode.OK
        pipeline.run(settings, stop=stop, progress_bar=progress_bar)
        return ExitCode.OK
    except JobError as exc:
        _settle()
        return _report(exc)
    except Exception as exc:
        _settle()
        torch = sys.modules.get("torch")  # not imported yet: not a GPU's error
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            message = ("out of GPU memory: lower JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE or JOB_TRAIN__MAX_LENGTH, or set "
                       "JOB_TRAIN__GRADIENT_CHECKPOINTING=true")
            log.error(message, extra={"fields": {"event": "error", "exit_code": int(ExitCode.OOM)}})
            _termination_message(ExitCode.OOM, message)
            return ExitCode.OOM
        disk = local_storage_error(exc, _local_dirs(settings))
        if disk is not None:  # the pod's disk, not a bug: no traceback, the path and variable named
            return _report(disk)
        log.exception("internal error (a bug; please report it): %s", type(exc).__name__,
                      extra={"fields": {"event": "error", "exit_code": int(ExitCode.INTERNAL)}})
        _termination_message(ExitCode.INTERNAL, f"internal error (a bug; please report it): {type(exc).__name__}")
        return ExitCode.INTERNAL
    finally:
        _settle()  # every way out of main(): from here to the exit a signal would only turn the decided code into a traceback


def _report(exc: JobError) -> int:
    log.error("%s", exc, extra={"fields": {"event": "error", "exit_code": int(exc.exit_code), "error": type(exc).__name__}})
    _termination_message(exc.exit_code, str(exc))
    return exc.exit_code


def _local_dirs(settings) -> dict[str, str]:
    """The local directories a disk error may be in, by variable: the scratch directory first (it writes the most)."""
    if settings is None:
        return {}
    from job.storage import LocalUri, parse_uri

    out = {"JOB_WORKDIR": settings.workdir}
    if isinstance(parse_uri(settings.output), LocalUri):
        out["JOB_OUTPUT"] = settings.output
    return out


def _termination_message(code: int, message: str) -> None:
    """The failure's one-line reason where Kubernetes reads it (the container's terminationMessagePath), so that
    `kubectl describe pod` and the Job's status say why without the logs. Redacted like the logs; best effort."""
    from job import logs
    from job.settings import termination_log_path

    path, explicit = termination_log_path()
    if not path or not (explicit or os.path.exists(path)):  # outside Kubernetes: never create /dev/termination-log
        return
    line = logs.redact(" ".join(f"exit {int(code)} ({ExitCode(code).name.lower()}): {message}".split()))
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(line[:4000] + "\n")  # the kubelet keeps at most 4096 bytes
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc.strerror or exc)


def _settle() -> None:
    """The run's outcome is decided (its error is about to be reported, or it is exiting): a SIGTERM or Ctrl-C from
    now on changes nothing, so it is ignored instead of raising `Preempted` into the report or the exit. torchrun
    sends SIGTERM to the other processes as soon as one fails; one that is already reporting its own error, or
    exiting, would otherwise print a traceback. What is left is short: the log line, then `_exit` (its atexit handlers
    took 0.02 s on the H200 host, docs/benchmarks.md, lever 14)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def cli() -> None:
    """`qlora-job` and `python -m job`: main(), then the exit without the interpreter's teardown."""
    _exit(main())


def _exit(code: int) -> None:
    """Exit with `code` once everything the run leaves behind is written: the atexit handlers run (temporary
    directories, log handlers) and the standard streams are flushed, then the process ends without the interpreter's
    teardown, which collects every object of torch, transformers and the rest one by one: 1.7-2.0 s of each stage's
    wall time on the H200 host (bench/results/bench-13b-1203-run9.json: `done` to the process's end), 3 s on 2 CPU
    cores, after the outputs were uploaded."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(0 if code is None else int(code))


if __name__ == "__main__":
    cli()

"""torchrun, as the image starts it for several GPUs, with the job's exit code instead of torchrun's own.

torchrun exits 1 whatever its processes returned, and 1 after SIGTERM too. Kubernetes (podFailurePolicy) and whoever
retries read the job's code (job/exitcodes.py): 2 config ... 143 stopped. So this returns the first failed process's
code (128+N if signal N killed it), or 128+N when torchrun itself was stopped by signal N, after its processes had
the time to save a checkpoint.

    python launch.py --standalone --nproc-per-node=4 -m job      (the same arguments as torchrun)
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

# torchrun waits this long for its processes after passing SIGTERM on, then kills them. Its own default, 30 s, is
# short for finishing a step and uploading a checkpoint; the pod's grace period (or `docker stop -t`) still bounds it.
os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
# SIGTERM is handled here (below), not by torchrun's own handler.
os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import main  # noqa: E402


def _on_sigterm(signum, frame):
    """Pass SIGTERM to the workers at once, then do what torchrun's handler does (raise in its main thread, which
    shuts the group down). torchrun's handler alone lost a SIGTERM in 2 of ~12 runs here (tests/test_container.py):
    the workers never heard of it, slept on and exited 0. Signalled directly, they save and exit 143, which reaches
    the caller even if the exception is lost. The workers are this process's children (each in its own session)."""
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signum)
    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def run(argv: list[str]) -> int:
    if "SIGTERM" not in os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

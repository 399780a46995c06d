"""Stop signals (SIGTERM from a spot reclaim or `docker stop`, Ctrl-C): before training the run stops at once; during
training it finishes the step, saves a checkpoint, uploads it and stops (job/checkpoints.py's callback). A module of
its own, without the training libraries, so that the command line installs it before their imports (10-20 s).
"""

from __future__ import annotations

import logging
import signal

from job.errors import Preempted

log = logging.getLogger("job.checkpoints")


class StopSignal:
    """SIGTERM/SIGINT handling. Before training: stop at once. During training: finish the step, save, upload, stop.

    With several processes, only some may be signalled (on multi-node, only the reclaimed pod's): `agree` makes
    every process stop after the same step, so that they save one checkpoint together and all exit 143.
    """

    def __init__(self):
        self.received: str | None = None  # why training stops: this process's signal, or another process's
        self.signalled: str | None = None  # this process's own signal
        self.training = False
        self.finished = False  # training is over (its final checkpoint uploaded); outputs are being written

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signalled or not self.training:
            when = (" (second signal)" if self.signalled else
                    " after training finished, while writing the outputs (its final checkpoint is uploaded: a rerun "
                    "with this JOB_RUN_ID writes them without training again)" if self.finished else
                    " before training started")
            raise Preempted(f"{name} received; stopping{when}", signal_name=name)
        self.signalled = name
        self.received = self.received or name
        log.warning("%s received: saving a checkpoint after this step, then stopping", name)

    def agree(self, device) -> str | None:
        """Whether to stop after this step; with several processes, the same answer on all of them.

        A process that stopped alone would leave the others waiting in the step's next collective (DDP's gradient
        all-reduce, the loss gather) and itself wait in the checkpoint's: nothing would be saved. So at each optimizer
        step the processes share their signal in one all-reduce of one number, on the device the collective backend
        works on (the GPU with NCCL, the CPU with gloo).
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([signal.Signals[self.signalled].value if self.signalled else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        other = int(flag.item())
        if other and not self.received:
            self.received = f"{signal.Signals(other).name} (on another process)"
            log.warning("%s: saving a checkpoint after this step, then stopping", self.received)
        return self.received

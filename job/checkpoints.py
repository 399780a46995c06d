"""Surviving spot reclaims: checkpoints go to storage as they are written, SIGTERM saves one more and stops, and
a new pod with the same run id continues from the latest complete one.

A remote checkpoint is complete when its `_COMPLETE` marker exists (uploaded after its files); older ones are
deleted once a newer one is complete, so storage holds one.
"""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

from transformers import TrainerCallback

from job import storage
from job.errors import Preempted

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"


class StopSignal:
    """SIGTERM/SIGINT handling. Before training: stop at once. During training: finish the step, save, upload, stop.

    With several processes, only some may be signalled (on multi-node, only the reclaimed pod's): `agree` makes
    every process stop after the same step, so that they save one checkpoint together and all exit 143.
    """

    def __init__(self):
        self.received: str | None = None  # why training stops: this process's signal, or another process's
        self.signalled: str | None = None  # this process's own signal
        self.training = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signalled or not self.training:
            raise Preempted(f"{name} received; stopping" + (" (second signal)" if self.signalled else " before training started"),
                            signal_name=name)
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


class CheckpointCallback(TrainerCallback):
    """Uploads each checkpoint the trainer saves; turns a stop signal on any process into save-and-stop at the
    next optimizer step's end, on every process."""

    def __init__(self, remote: storage.Uri, stop: StopSignal, token: str | None):
        self.remote, self.stop, self.token = remote, stop, token

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agree(args.device):
            control.should_save = True
            control.should_training_stop = True
        if state.global_step >= state.max_steps:
            # The finished training is a checkpoint too: if the final upload fails (network, a reclaimed node), the
            # rerun resumes here and only uploads, instead of training again from the last periodic checkpoint.
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        try:
            if state.is_world_process_zero:
                self._upload(state.global_step, Path(args.output_dir))
        finally:
            # The others wait for the upload: one that went on to exit (a stop) would make torchrun end this one.
            _barrier()

    def _upload(self, step: int, output_dir: Path) -> None:
        name = f"checkpoint-{step}"
        local = output_dir / name
        target = self.remote.join(name)
        storage.push(local, target, self.token)
        marker = local / MARKER
        marker.write_text(f"{step}\n")
        storage.push(marker, target.join(MARKER), self.token)
        log.info("checkpoint %s uploaded to %s", name, target)
        for old in complete_checkpoints(self.remote, self.token)[:-1]:
            storage.delete(self.remote.join(old), self.token)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def complete_checkpoints(remote: storage.Uri, token: str | None) -> list[str]:
    """Names of the complete remote checkpoints, oldest first."""
    names = storage.list_names(remote, token)
    steps = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(rf"checkpoint-(\d+)/{MARKER}", n)))
    return [f"checkpoint-{s}" for s in steps]


def pull_latest(remote: storage.Uri, local_dir: Path, token: str | None, identity: str | None = None) -> Path | None:
    """Download the latest complete checkpoint, if any; returns its local directory. A checkpoint written by a run of
    another identity (job_state.json, see stages/common.py) is never resumed from."""
    import json

    done = complete_checkpoints(remote, token)
    if not done:
        return None
    name = done[-1]
    path, _ = storage.pull(remote.join(name + "/"), local_dir / name, token=token)
    saved = Path(path) / "job_state.json"
    if identity and saved.exists() and json.loads(saved.read_text()).get("identity") not in (None, identity):
        log.warning("not resuming from %s: it belongs to another run identity", remote.join(name))
        return None
    log.info("resuming from %s", remote.join(name))
    return path

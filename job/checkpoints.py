"""Surviving spot reclaims: checkpoints go to storage as they are written, SIGTERM saves one more and stops, and
a new pod with the same run id continues from the latest complete one.

A remote checkpoint is complete when its `_COMPLETE` marker exists (uploaded after its files); older ones are
deleted once a newer one is complete, so storage holds one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback

from job import storage
from job.signals import StopSignal

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"


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
        """Every process has written its part (rng_state_<rank>.pth) before anything is uploaded; rank 0 uploads
        the checkpoint, the first process of each other node its node's RNG files; the marker goes last, once all
        are up. Each barrier is also what keeps the others waiting for the uploads: one that went on to exit (a
        stop) would make torchrun end the uploading one."""
        name = f"checkpoint-{state.global_step}"
        local, target = Path(args.output_dir) / name, self.remote.join(name)
        _barrier()
        try:
            if state.is_world_process_zero:
                storage.push(local, target, self.token)
            elif args.local_process_index == 0 and args.process_index != args.local_process_index:
                for own in sorted(local.glob("rng_state_*.pth")):  # another node's: rank 0 can't see them
                    storage.push(own, target.join(own.name), self.token)
        finally:
            _barrier()
        try:
            if state.is_world_process_zero:
                self._mark_complete(state.global_step, local, target)
        finally:
            _barrier()
        if args.local_process_index == 0:
            _prune_local(Path(args.output_dir), keep=name)

    def _mark_complete(self, step: int, local: Path, target: storage.Uri) -> None:
        marker = local / MARKER
        # What rank 0 uploaded, by size: a resume checks it (other nodes' RNG files are uploaded but not listed).
        marker.write_text(json.dumps({"step": step, "files": manifest(local)}) + "\n")
        storage.push(marker, target.join(MARKER), self.token)
        log.info("checkpoint %s uploaded to %s", local.name, target)
        for old in complete_checkpoints(self.remote, self.token)[:-1]:
            storage.delete(self.remote.join(old), self.token)


def _prune_local(output_dir: Path, keep: str) -> None:
    """Only the latest checkpoint stays on the local disk once it is uploaded (0.75 GB per save at 13B, r=16: a long
    run's would fill a pod's ephemeral storage). Resuming reads the uploaded one."""
    import shutil

    for old in output_dir.glob("checkpoint-*"):
        if old.name != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def complete_checkpoints(remote: storage.Uri, token: str | None) -> list[str]:
    """Names of the complete remote checkpoints, oldest first."""
    names = storage.list_names(remote, token)
    steps = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(rf"checkpoint-(\d+)/{MARKER}", n)))
    return [f"checkpoint-{s}" for s in steps]


def manifest(local: Path) -> dict[str, int]:
    """name -> size of a local checkpoint's files: what its marker records, and what a resume checks it against."""
    return {p.relative_to(local).as_posix(): p.stat().st_size for p in sorted(local.rglob("*"))
            if p.is_file() and p.name != MARKER}


def damage(path: Path) -> str | None:
    """What is wrong with a downloaded checkpoint (a file missing or cut short since its upload: a deleted object, a
    truncated copy), or None. Checks the sizes its marker recorded, then each file's own structure (torch's zip
    archives with their CRCs, safetensors headers, JSON)."""
    import json
    import zipfile

    from job.model import safetensors_problem

    try:
        recorded = json.loads((path / MARKER).read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}  # a marker of an older version: the step only
    have = manifest(path)
    for name, size in recorded.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes, {size} were uploaded"
    for name in have:
        file = path / name
        try:
            if file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as z:
                    if z.testzip() is not None:
                        return f"{name} is damaged (a CRC mismatch)"
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            return f"{name} is truncated or damaged ({type(exc).__name__})"
    for name in have:
        if name.endswith(".safetensors") and (problem := safetensors_problem(path / name)):
            return problem
    if not recorded and "trainer_state.json" not in have:
        return "trainer_state.json is missing"
    return None


def pull_latest(remote: storage.Uri, local_dir: Path, token: str | None, identity: str | None = None) -> Path | None:
    """Download the latest complete checkpoint, if any; returns its local directory. A checkpoint written by a run of
    another identity (job_state.json, see stages/common.py) is never resumed from. A damaged one (see `damage`) is
    passed over for an older complete one; with none left the run stops with exit 2 saying to set JOB_RESTART=true
    (retrying would find the same damage)."""
    import json

    from job.errors import ConfigError

    done = complete_checkpoints(remote, token)
    problems = []
    for name in reversed(done):
        path, _ = storage.pull(remote.join(name + "/"), local_dir / name, token=token)
        problem = damage(Path(path))
        if problem:
            log.warning("not resuming from %s: %s", remote.join(name), problem)
            problems.append(f"{name}: {problem}")
            continue
        saved = Path(path) / "job_state.json"
        if identity and saved.exists() and json.loads(saved.read_text()).get("identity") not in (None, identity):
            log.warning("not resuming from %s: it belongs to another run identity", remote.join(name))
            return None
        log.info("resuming from %s", remote.join(name))
        return path
    if problems:
        raise ConfigError(f"JOB_RUN_ID: can't resume this run from {remote}: " + "; ".join(problems) + ". Set "
                          "JOB_RESTART=true to discard what is stored for this run id and train from the start")
    return None

"""The pod's infrastructure failing under the job (issue 25): a full disk, an unreadable file, a damaged checkpoint, a
signal at an awkward moment. Each is reported with its exit code (job/exitcodes.py) and a message naming the path and
the variable, without a traceback, with nothing marked successful; the failure's one line also goes to the
termination message file Kubernetes shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, ROOT, job_env, run_job, run_sft_in_process


def _sft_env(tiny_model: Path, tmp_path: Path, run_id: str, **extra: str) -> dict:
    """The environment run_sft_in_process uses, for a `python -m job` subprocess continuing the same run."""
    return job_env(**{"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(DEMO_DATA / "sft.jsonl"),
                      "JOB_OUTPUT": str(tmp_path / "out"), "JOB_WORKDIR": str(tmp_path / "w2" / run_id),
                      "JOB_TRAIN__MAX_STEPS": "2", "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__MAX_LENGTH": "128",
                      "JOB_EVAL_PROMPTS": "none", "JOB_RUN_ID": run_id, "JOB_LOG_FORMAT": "json", **extra})


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory) -> Path:
    """A run whose training finished (its final checkpoint uploaded) and whose publishing failed: what a retry finds."""
    from job import outputs
    from job.errors import TransientError

    tmp = tmp_path_factory.mktemp("stopped")
    mp = pytest.MonkeyPatch()

    def fail(*a, **kw):
        raise TransientError("storage went away")

    mp.setattr(outputs, "publish", fail)
    try:
        with pytest.raises(TransientError):
            run_sft_in_process(tiny_model, tmp, "stopped", steps=2)
    finally:
        mp.undo()
    assert (tmp / "out" / "stopped" / "checkpoints" / "checkpoint-2" / "_COMPLETE").exists()
    return tmp


def _copy_run(stopped_run: Path, tmp_path: Path, run_id: str) -> Path:
    shutil.copytree(stopped_run / "out" / "stopped", tmp_path / "out" / run_id)
    return tmp_path / "out" / run_id / "checkpoints"


def test_a_damaged_checkpoint_falls_back_to_an_older_one_or_says_to_restart(tiny_model, stopped_run, tmp_path):
    # optimizer.pt cut short (a torn upload) and no older checkpoint: exit 2 naming the file and JOB_RESTART.
    checkpoints = _copy_run(stopped_run, tmp_path, "torn")
    optimizer = checkpoints / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    r = run_job(_sft_env(tiny_model, tmp_path, "torn"))
    assert r.returncode == ExitCode.CONFIG, r.stderr[-3000:]
    assert "checkpoint-2: optimizer.pt has" in r.stderr and "JOB_RESTART=true" in r.stderr and "JOB_RUN_ID" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "torn" / "_SUCCESS").exists()

    # A file deleted from the latest, an older complete one still there: the run resumes from the older one.
    checkpoints = _copy_run(stopped_run, tmp_path, "fallback")
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-1")
    (checkpoints / "checkpoint-2" / "scheduler.pt").unlink()
    r = run_job(_sft_env(tiny_model, tmp_path, "fallback"))
    assert r.returncode == ExitCode.OK, r.stderr[-3000:]
    assert "checkpoint-2: scheduler.pt is missing" in r.stderr or "scheduler.pt is missing" in r.stderr
    assert json.loads((tmp_path / "out" / "fallback" / "run.json").read_text())["resumed_from"] == "checkpoint-1"


def test_damage_finds_a_truncated_or_missing_file_without_a_manifest(stopped_run, tmp_path):
    """Checkpoints uploaded before the marker listed their files are still checked: each file's own structure."""
    from job.checkpoints import MARKER, damage

    ckpt = tmp_path / "c"
    shutil.copytree(stopped_run / "out" / "stopped" / "checkpoints" / "checkpoint-2", ckpt)
    assert damage(ckpt) is None
    (ckpt / MARKER).write_text("2\n")  # an old marker: the step only
    assert damage(ckpt) is None
    adapter = ckpt / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])
    assert "adapter_model.safetensors is truncated" in damage(ckpt)
    adapter.unlink()
    rng = ckpt / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:100])
    assert "rng_state.pth is truncated or damaged" in damage(ckpt)


SIGNAL_IN_A_LOG_CALL = r'''
import logging, os, signal, sys
import job.__main__ as m
from job import pipeline

WHEN = sys.argv.pop(1)

class Slow:
    """A value whose formatting is where the SIGTERM lands: inside the handler's emit."""
    def __str__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return "x"

def run(s, stop, progress_bar):
    stop.finished = WHEN == "after"  # what pipeline._train_once records once training is over
    logging.getLogger("job").info("writing outputs", extra={"fields": {"what": Slow()}})
    return "never reached"

pipeline.run = run
m.cli()
'''


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_sigterm_inside_a_log_call_stops_the_run_with_143(tmp_path, when):
    """logging swallows whatever its handler's emit raises ("--- Logging error ---"): a SIGTERM landing there was
    lost and the run went on to exit 0. After training the message said "before training started"."""
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tmp_path), JOB_DATA=str(tmp_path / "d.jsonl"),
                  JOB_OUTPUT=str(tmp_path / "out"), JOB_LOG_FORMAT="json", JOB_TERMINATION_LOG=str(tmp_path / "termination-log"))
    r = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_LOG_CALL, when], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == ExitCode.PREEMPTED, r.stderr[-3000:]
    assert "Logging error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = ("after training finished, while writing the outputs (its final checkpoint is uploaded"
            if when == "after" else "before training started")
    assert said in r.stderr
    # Kubernetes' termination message: the one line, with its exit code.
    assert (tmp_path / "termination-log").read_text().startswith(f"exit 143 (preempted): SIGTERM received; stopping {said}")


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem with little room: a tmpfs (needs root, as in CI's container); `fill(kib)` leaves that much."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"can't mount a tmpfs here ({r.stderr.strip()}); tests/test_infra.py::test_disk_errors_"
                    "are_recognised_in_every_form_the_libraries_raise covers the classification without a mount")

    def fill(kib: int) -> Path:
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * (free - kib * 1024))
        return mount

    yield fill
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("variable", ["JOB_WORKDIR", "JOB_OUTPUT"])
def test_a_full_disk_is_exit_74_naming_the_variable_and_the_path(tiny_model, tmp_path, small_disk, variable):
    """The output disk full while publishing, the scratch disk full while saving a checkpoint (torch's message was
    only "unexpected pos 45504 vs 45392"): exit 74, a retryable code, not "internal error (a bug)"."""
    disk = small_disk(64 if variable == "JOB_WORKDIR" else 24)
    env = _sft_env(tiny_model, tmp_path, "full", JOB_TERMINATION_LOG=str(tmp_path / "termination-log"),
                   JOB_TRAIN__MAX_STEPS="1")
    env.update({"JOB_WORKDIR": str(disk / "w")} if variable == "JOB_WORKDIR" else {"JOB_OUTPUT": str(disk / "out")})
    r = run_job(env)
    assert r.returncode == ExitCode.LOCAL_STORAGE, r.stderr[-3000:]
    assert f"{variable}={env[variable]}: " in r.stderr and "MiB free there" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not list(Path(env["JOB_OUTPUT"]).rglob("_SUCCESS"))
    assert (tmp_path / "termination-log").read_text().startswith(f"exit 74 (local_storage): {variable}=")


def test_disk_errors_are_recognised_in_every_form_the_libraries_raise(tmp_path):
    """Without a mount (test_a_full_disk_... skips): what the libraries raise on a full disk, classified with the
    variable whose directory holds the path. torch.save keeps no errno, copytree gathers its errors in a list."""
    import errno

    from job.errors import local_storage_error

    work, out = tmp_path / "w", tmp_path / "out"
    dirs = {"JOB_WORKDIR": str(work), "JOB_OUTPUT": str(out)}
    copy = shutil.Error([(str(work / "x"), str(out / "r" / "x"), f"[Errno 28] No space left on device: '{out}/r/x'")])
    assert str(local_storage_error(copy, dirs)).startswith(f"JOB_OUTPUT={out}: {out}/r/x: can't write to the local disk (No space")
    nospace = OSError(errno.ENOSPC, "No space left on device", str(work / "c" / "optimizer.pt"))
    assert str(local_storage_error(nospace, dirs)).startswith(f"JOB_WORKDIR={work}: {work}/c/optimizer.pt: ")
    torch_save = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 45504 vs 45392")
    assert "JOB_WORKDIR=" in str(local_storage_error(torch_save, dirs)) and "unexpected pos" in str(local_storage_error(torch_save, dirs))
    assert local_storage_error(ValueError("a bug"), dirs) is None
    assert local_storage_error(OSError(errno.ENOENT, "No such file or directory"), dirs) is None


def _main_in_process(monkeypatch, env: dict) -> int:
    """job.__main__.main() in this process (so that a test can patch the job's functions), with `env` as the
    environment; the signal handlers it installs are put back afterwards."""
    import os
    import signal

    import job.__main__ as m

    for k in [k for k in os.environ if k.startswith("JOB_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return m.main([])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_an_unreadable_data_file_is_exit_3_naming_the_variable_and_the_file(tiny_model, tmp_path, monkeypatch, capsys):
    """Mode 000 stops only non-root users, and the tests run as root: the read fails as it would for them (EACCES
    from the first open). test_an_unreadable_data_file_for_a_user below is the real thing where not root."""
    import errno

    from job import storage

    data = tmp_path / "d.jsonl"
    shutil.copyfile(DEMO_DATA / "sft.jsonl", data)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(storage, "sha256", denied)
    env = _sft_env(tiny_model, tmp_path, "unreadable", JOB_DATA=str(data))
    assert _main_in_process(monkeypatch, env) == ExitCode.DATA
    err = capsys.readouterr().err
    assert f"JOB_DATA: {data}: can't read it (Permission denied); make it readable by the job's user" in err, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root reads a mode-000 file; the test above covers the same path")
def test_an_unreadable_data_file_for_a_user(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copyfile(DEMO_DATA / "sft.jsonl", data)
    data.chmod(0)
    r = run_job(_sft_env(tiny_model, tmp_path, "unreadable", JOB_DATA=str(data)))
    assert r.returncode == ExitCode.DATA and f"JOB_DATA: {data}: can't read it (Permission denied)" in r.stderr


def test_long_runs_keep_one_local_checkpoint_and_clean_the_scratch_folder_once_uploaded(tiny_model, tmp_path):
    """Local checkpoints were never pruned (0.75 GB per save at 13B), and JOB_WORKDIR kept a copy of every run's
    outputs, checkpoints and weights: after a successful upload only the latest checkpoint stays, and the run's scratch
    folder goes unless JOB_KEEP_WORKDIR=true."""
    kept = run_sft_in_process(tiny_model, tmp_path, "kept", steps=3, JOB_TRAIN__SAVE_STEPS="1", JOB_KEEP_WORKDIR="true")
    assert (kept / "_SUCCESS").exists()
    assert sorted(p.name for p in (tmp_path / "w" / "kept" / "kept" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3"]
    assert (tmp_path / "w" / "kept" / "kept" / "out" / "adapter").is_dir()
    cleaned = run_sft_in_process(tiny_model, tmp_path, "cleaned", steps=1)
    assert (cleaned / "_SUCCESS").exists() and (cleaned / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "w" / "cleaned" / "cleaned").exists()

"""The run lock (job/runlock.py): one run per run id at a time, on S3 (moto's real server: conditional writes) and
local outputs; a dead run's lock expires, a later attempt of the same Job takes it over at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from job.errors import ConfigError
from job.exitcodes import ExitCode

from conftest import DEMO_DATA, ROOT, Watchdog, job_env


def _settings(output: str, **extra: str):
    from job.settings import load_settings

    return load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": output, **extra})


def test_s3_one_holder_at_a_time_released_at_the_end(s3):
    from job import runlock

    s = _settings(f"s3://{s3.bucket}/runs")
    with runlock.hold(s, "r1"):
        body = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r1.lock")["Body"].read())
        assert body["pid"] > 0 and body["ttl"] == 300
        with pytest.raises(ConfigError) as e:
            with runlock.hold(s, "r1"):
                pass
        assert str(e.value).startswith("JOB_RUN_ID=r1: another run with this run id is in progress (s3://")
        with runlock.hold(s, "r2"):  # another run id: its own lock
            pass
    assert "Contents" not in s3.list_objects_v2(Bucket=s3.bucket, Prefix="runs/r1.lock")
    with runlock.hold(s, "r1"):  # free again
        pass


def test_s3_a_dead_runs_lock_expires_and_a_later_attempt_of_the_same_job_takes_it_at_once(s3):
    from job import runlock

    def dead(group: str | None, ttl: int) -> None:  # what a run killed with -9 leaves behind
        s3.put_object(Bucket=s3.bucket, Key="runs/r.lock", Body=json.dumps({"host": "gone", "pid": 1, "group": group, "ttl": ttl}))

    dead("job-uid-1", 300)
    with pytest.raises(ConfigError, match="host gone"):  # another Job's attempt: alive as far as anyone can tell
        with runlock.hold(_settings(f"s3://{s3.bucket}/runs", JOB_ATTEMPT_GROUP="job-uid-2"), "r"):
            pass
    with runlock.hold(_settings(f"s3://{s3.bucket}/runs", JOB_ATTEMPT_GROUP="job-uid-1"), "r"):  # its retry
        assert json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r.lock")["Body"].read())["group"] == "job-uid-1"
    dead(None, 1)
    time.sleep(2.1)  # older than its TTL by the server's clock (second resolution)
    with runlock.hold(_settings(f"s3://{s3.bucket}/runs"), "r"):
        pass


def test_s3_the_heartbeat_refreshes_the_lock_and_notices_a_takeover(s3):
    from job import runlock

    s = _settings(f"s3://{s3.bucket}/runs", JOB_LOCK_TTL="10")
    with runlock.hold(s, "r") as lock:
        first = s3.head_object(Bucket=s3.bucket, Key="runs/r.lock")["ETag"]
        deadline = time.monotonic() + 20  # a beat every TTL/3 s, each an S3 call on 2 busy cores
        while s3.head_object(Bucket=s3.bucket, Key="runs/r.lock")["ETag"] == first and time.monotonic() < deadline:
            time.sleep(0.5)
        assert s3.head_object(Bucket=s3.bucket, Key="runs/r.lock")["ETag"] != first
        lock.check()
        s3.put_object(Bucket=s3.bucket, Key="runs/r.lock", Body=b'{"host": "other"}')  # taken over meanwhile
        deadline = time.monotonic() + 20
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.5)
        with pytest.raises(ConfigError, match="lost its lock"):
            lock.check()
    assert json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r.lock")["Body"].read()) == {"host": "other"}


def test_local_lock_ends_with_its_process(tmp_path):
    from job import runlock

    s = _settings(str(tmp_path / "out"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom job import runlock\nfrom job.settings import "
                               f"load_settings\ns = load_settings({{'JOB_STAGE': 'sft', 'JOB_BASE_MODEL': '/m', 'JOB_DATA': '/d', "
                               f"'JOB_OUTPUT': {str(tmp_path / 'out')!r}}})\nwith runlock.hold(s, 'r'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n"], cwd=ROOT, env=job_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    with Watchdog(holder, 120):
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"JOB_RUN_ID=r: another run .*r\.lock: host .*The lock ends with its process"):
            with runlock.hold(s, "r"):
                pass
        holder.kill()  # kill -9: no cleanup
        holder.wait()
    with runlock.hold(s, "r"):
        pass


def test_a_second_run_with_the_same_run_id_exits_2_while_the_first_trains(tiny_model, s3, tmp_path):
    """Two `python -m job` with one JOB_RUN_ID on S3: the second exits 2 naming JOB_RUN_ID, publishes nothing; the
    first finishes as if alone."""
    env = job_env(**s3.env, JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                  JOB_OUTPUT=f"s3://{s3.bucket}/runs", JOB_RUN_ID="twice", JOB_TRAIN__MAX_STEPS="3", JOB_TRAIN__SAVE_STEPS="0",
                  JOB_TRAIN__MAX_LENGTH="128", JOB_EVAL_PROMPTS="none", JOB_LOG_FORMAT="json")
    first = subprocess.Popen([sys.executable, "-m", "job"], env={**env, "JOB_WORKDIR": str(tmp_path / "w1")}, cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    with Watchdog(first, 480) as dog:
        for line in first.stderr:
            if '"event": "start"' in line:  # holding the lock, about to train
                break
        # Paused while the second starts (its imports alone can outlast a 3-step run of the tiny model, which would
        # then find the run succeeded instead): the lock stays as fresh as a live run's, within JOB_LOCK_TTL.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run([sys.executable, "-m", "job"], env={**env, "JOB_WORKDIR": str(tmp_path / "w2")},
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        rest = first.stderr.read()
        first.wait()
    assert not dog.fired
    assert second.returncode == ExitCode.CONFIG, second.stderr[-3000:]
    assert "JOB_RUN_ID=twice: another run with this run id is in progress" in second.stderr
    assert "Traceback" not in second.stderr and "uploading" not in second.stderr
    assert first.returncode == 0, rest[-3000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket, Prefix="runs/")["Contents"]]
    assert "runs/twice/_SUCCESS" in keys and "runs/twice.lock" not in keys

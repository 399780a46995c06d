"""Storage faults against the real S3 server (moto's, on loopback) seen through a proxy that injects them
(tests/s3proxy.py): an outage of a few seconds, 5xx, 403, and kill -9 of the job while it uploads.

What a user relies on: a blip is ridden out by botocore's retries; a longer one ends the run with 75 (retry) and the
next attempt resumes; access denied ends it at once with 2 (no retries, no traceback); `_SUCCESS` exists only when
every output is complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from job import storage
from job.errors import ConfigError, TransientError
from job.exitcodes import ExitCode
from job.storage import S3Uri

from conftest import AWS_ENV, DEMO_DATA, FAKE_SECRET, ROOT, job_env, keys, run_job, upload_dir
from s3proxy import S3Proxy


@pytest.fixture
def proxy(s3, s3_server, monkeypatch):
    """The proxy in front of the test server; in-process code (storage.*) goes through it too."""
    p = S3Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    yield p
    p.close()


def test_retry_budget_is_botocores_standard_mode_with_twelve_attempts(proxy, monkeypatch):
    """The budget a blip must fit in, from botocore's own backoff: rand(0,1) * min(50 ms * 2**i, 20 s) per retry."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage._s3().meta.config.retries == {"mode": "standard", "total_max_attempts": 12}
    waits = [ExponentialBackoff(random=lambda: 1.0).delay_amount(_Attempt(n)) for n in range(1, 12)]
    assert 60 < sum(waits) < 70 and 30 < sum(waits) / 2  # at most ~66 s, ~33 s on average
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the standard variable still wins
    assert storage._s3().meta.config.retries["total_max_attempts"] == 3


class _Attempt:
    def __init__(self, n):
        self.attempt_number, self.http_response, self.parsed_response, self.caught_exception = n, None, None, None
        self.operation_model = None


def test_an_outage_of_a_few_seconds_is_ridden_out_by_retries(proxy, s3, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1000)
    proxy.when("PUT", "/out/f$", lambda: proxy.down(5))
    t0 = time.monotonic()
    storage.push(tmp_path / "f", S3Uri(s3.bucket, "out/f"))
    assert time.monotonic() - t0 >= 5
    puts = proxy.requests("PUT", "/out/f$")
    assert puts[0][3] == "reset" and puts[-1][3] == 200  # refused during the outage, then stored
    assert len([e for e in proxy.log if e[3] == "reset"]) >= 2
    assert s3.get_object(Bucket=s3.bucket, Key="out/f")["Body"].read() == b"x" * 1000


def test_an_outage_longer_than_the_retries_is_a_transient_error(proxy, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.down(60)
    with pytest.raises(TransientError, match=f"s3://{s3.bucket}/k: S3 request failed after retries"):
        storage.exists(S3Uri(s3.bucket, "k"))
    assert len(proxy.log) == 2


def _ops(s3, tmp_path):
    s3.put_object(Bucket=s3.bucket, Key="in/a.jsonl", Body=b"{}\n")
    (tmp_path / "up.txt").write_text("u")
    return {
        "push": ("PUT", lambda: storage.push(tmp_path / "up.txt", S3Uri(s3.bucket, "out/up.txt"))),
        "pull": ("GET", lambda: storage.pull(S3Uri(s3.bucket, "in/a.jsonl"), tmp_path / "dl")),
        "exists": ("HEAD", lambda: storage.exists(S3Uri(s3.bucket, "in/a.jsonl"))),
        "list": ("GET", lambda: storage.list_names(S3Uri(s3.bucket, "in/"))),
    }


@pytest.mark.parametrize("op", ["push", "pull", "exists", "list"])
def test_5xx_is_retried_by_botocore(proxy, s3, tmp_path, op):
    method, call = _ops(s3, tmp_path)[op]
    proxy.fail(500, method=method, times=2)
    proxy.fail(503, method=method, times=1)  # SlowDown: throttling, botocore's longer backoff
    call()
    statuses = [e[3] for e in proxy.requests(method)]
    assert statuses[:4] == [500, 500, 503, 200]


@pytest.mark.parametrize("op", ["push", "pull", "exists", "list"])
def test_403_fails_at_once_as_a_config_error(proxy, s3, tmp_path, op):
    method, call = _ops(s3, tmp_path)[op]
    proxy.fail(403, method=method, times=None)
    with pytest.raises(ConfigError, match=f"s3://{s3.bucket}/.*: access denied .*check the credentials and the bucket policy"):
        call()
    assert len(proxy.requests(method)) == 1  # not retried


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def job(s3, tiny_model, proxy, tmp_path):
    """A 4-step SFT run (checkpoints at steps 2 and 4) whose every S3 request goes through the proxy."""
    upload_dir(s3, s3.bucket, tiny_model, "models/tiny")
    s3.upload_file(str(DEMO_DATA / "sft.jsonl"), s3.bucket, "data/train.jsonl")

    def env(run_id: str, attempt: int = 1, **extra) -> dict:
        return job_env(**{**s3.env, "AWS_ENDPOINT_URL": proxy.url}, HF_TOKEN=FAKE_SECRET, JOB_STAGE="sft", JOB_RUN_ID=run_id,
                       JOB_BASE_MODEL=f"s3://{s3.bucket}/models/tiny/", JOB_DATA=f"s3://{s3.bucket}/data/train.jsonl",
                       JOB_OUTPUT=f"s3://{s3.bucket}/runs", JOB_WORKDIR=str(tmp_path / f"work{attempt}"), JOB_LOG_FORMAT="json",
                       JOB_TRAIN__MAX_STEPS="4", JOB_TRAIN__SAVE_STEPS="2", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
                       JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__MAX_LENGTH="128", JOB_TRAIN__LOGGING_STEPS="1",
                       # as the base Job sets it: attempts of one Job take over each other's run lock (job/runlock.py)
                       JOB_ATTEMPT_GROUP="the-job-uid", **extra)

    return env


def _clean(r) -> None:
    out = r.stdout + r.stderr
    assert "Traceback" not in out and FAKE_SECRET not in out and AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in out


def _run_json(s3, run_id: str) -> dict:
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=f"runs/{run_id}/run.json")["Body"].read())


def _succeeded(s3, run_id: str) -> bool:
    return f"runs/{run_id}/_SUCCESS" in keys(s3, s3.bucket, f"runs/{run_id}/")


FINAL = r"/runs/{}/adapter/"  # the final upload starts with the adapter


def test_a_bad_storage_day_is_ridden_out(job, proxy, s3):
    """5xx on downloads and uploads, and the server gone for 5 s twice: during training (a checkpoint upload) and
    during the final upload. botocore's retries carry the run through: it succeeds, in one attempt."""
    proxy.fail(500, method="GET", path="/models/tiny/", times=2)
    proxy.fail(503, method="GET", path="/data/", times=1)
    proxy.when("PUT", "/runs/bad-day/checkpoints/checkpoint-2/", lambda: proxy.down(5))
    proxy.when("PUT", FINAL.format("bad-day"), lambda: proxy.down(5))
    proxy.fail(500, method="PUT", path="/runs/bad-day/metrics.json", times=1)
    r = run_job(job("bad-day"))
    assert r.returncode == 0, r.stderr[-3000:]
    _clean(r)
    assert _succeeded(s3, "bad-day") and _run_json(s3, "bad-day")["resumed_from"] is None
    resets = [e for e in proxy.log if e[3] == "reset"]
    assert len(resets) >= 4 and resets[-1][0] - resets[0][0] >= 5  # both outages happened, and were retried through
    assert [e[3] for e in proxy.requests("PUT", "/runs/bad-day/metrics.json$")][-2:] == [500, 200]
    assert "/checkpoints/" not in str(keys(s3, s3.bucket, "runs/bad-day/"))


def _complete(s3, run_id: str) -> list[str]:
    return [k.split("/")[-2] for k in keys(s3, s3.bucket, f"runs/{run_id}/checkpoints/") if k.endswith("/_COMPLETE")]


def test_attempts_cut_short_by_storage_or_kill_9_resume_until_one_completes(job, proxy, s3):
    """One run id through four attempts, as a Job's pods would see it (each on a fresh disk). An outage that outlasts
    the retries (AWS_MAX_ATTEMPTS=2 here, a budget of ~50 ms) ends an attempt with 75; kill -9 ends one without a
    word. None of them leaves `_SUCCESS`; each next attempt resumes from the last complete checkpoint."""
    run_id = "attempts"

    # 1. The server goes away while checkpoint-4 is uploaded: 75, and checkpoint-2 is the one that is complete.
    proxy.when("PUT", f"/runs/{run_id}/checkpoints/checkpoint-4/", lambda: proxy.down(3))
    r = run_job(job(run_id, 1, AWS_MAX_ATTEMPTS="2"))
    assert r.returncode == ExitCode.TRANSIENT, r.stderr[-3000:]
    _clean(r)
    assert "S3 request failed after retries" in r.stderr
    assert _complete(s3, run_id) == ["checkpoint-2"] and not _succeeded(s3, run_id)
    # A retried pod starts seconds later; the job reaches storage within a second of its start (before the training
    # stack's import), so the next attempt starts once the outage is over, as the retry would find it.
    proxy.wait_up()

    # 2. Resumes from checkpoint-2, trains to step 4; the server goes away during the final upload: 75 again.
    proxy.when("PUT", FINAL.format(run_id), lambda: proxy.down(3))
    r = run_job(job(run_id, 2, AWS_MAX_ATTEMPTS="2"))
    assert r.returncode == ExitCode.TRANSIENT, r.stderr[-3000:]
    _clean(r)
    assert f"resuming from s3://{s3.bucket}/runs/{run_id}/checkpoints/checkpoint-2" in r.stderr
    assert _complete(s3, run_id) == ["checkpoint-4"] and not _succeeded(s3, run_id)
    proxy.wait_up()

    # 3. kill -9 in the middle of the final upload, once two of its files are stored.
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=job(run_id, 3), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def kill():
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    proxy.when("PUT", FINAL.format(run_id), kill, nth=3)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    outputs = [k for k in keys(s3, s3.bucket, f"runs/{run_id}/") if "/checkpoints/" not in k]
    assert len(outputs) >= 2 and not _succeeded(s3, run_id)

    # 4. Completes, from checkpoint-4.
    r = run_job(job(run_id, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    _clean(r)
    assert _succeeded(s3, run_id) and _run_json(s3, run_id)["resumed_from"] == "checkpoint-4"
    metrics = json.loads(s3.get_object(Bucket=s3.bucket, Key=f"runs/{run_id}/metrics.json")["Body"].read())
    assert metrics["steps"] == 4  # not one more: resumed at JOB_TRAIN__MAX_STEPS, nothing is left to train
    done = set(keys(s3, s3.bucket, f"runs/{run_id}/"))
    assert {f"runs/{run_id}/{n}" for n in ("metrics.json", "run.json", "adapter/adapter_model.safetensors")} <= done


def test_403_exits_2_at_once_naming_the_uri(job, proxy, s3):
    proxy.fail(403, times=None)  # e.g. credentials without access to this bucket
    t0 = time.monotonic()
    r = run_job(job("denied"))
    assert r.returncode == ExitCode.CONFIG, r.stderr[-3000:]
    _clean(r)
    assert f"JOB_OUTPUT: s3://{s3.bucket}/runs/denied: access denied" in r.stderr  # the variable and the run's URI
    assert len(proxy.log) == 1 and time.monotonic() - t0 < 60  # the first request, not retried

"""End to end, as a user runs it: `python -m job` subprocesses configured by env vars, 4-bit NF4 on, data and base
model read from and outputs written to a real S3-compatible server on loopback (AWS_ENDPOINT_URL)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, FAKE_SECRET, ROOT, job_env, json_lines, keys, run_job, upload_dir


@pytest.fixture
def bucket(s3, tiny_model):
    upload_dir(s3, s3.bucket, tiny_model, "models/tiny")
    s3.upload_file(str(DEMO_DATA / "sft.jsonl"), s3.bucket, "data/sft/train.jsonl")
    s3.upload_file(str(DEMO_DATA / "dpo.csv"), s3.bucket, "data/preferences.csv")
    return s3


def env_for(s3, tmp_path, **extra):
    return job_env(
        **s3.env,
        HF_TOKEN=FAKE_SECRET,
        JOB_BASE_MODEL=f"s3://{s3.bucket}/models/tiny/",
        JOB_OUTPUT=f"s3://{s3.bucket}/runs",
        JOB_WORKDIR=str(tmp_path / "work"),
        JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
        JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1",
        JOB_TRAIN__LOGGING_STEPS="1",
        JOB_TRAIN__LEARNING_RATE="5e-3",
        JOB_TRAIN__MAX_LENGTH="128",
        **extra,
    )


def download(s3, prefix, dest):
    for key in keys(s3, s3.bucket, prefix):
        target = dest / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(s3.bucket, key, str(target))
    return dest


def assert_no_secret(s3, prefix, *texts):
    for key in keys(s3, s3.bucket, prefix):
        assert FAKE_SECRET.encode() not in s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read(), key
    for t in texts:
        assert FAKE_SECRET not in t


def test_sft_then_dpo_on_s3_and_the_adapter_changes_the_model(bucket, tiny_model, tmp_path):
    s3 = bucket
    r = run_job(env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/sft/", JOB_RUN_ID="sft-1",
                        JOB_EVAL_FRACTION="0.2", JOB_TRAIN__MAX_STEPS="6", JOB_TRAIN__SAVE_STEPS="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = keys(s3, s3.bucket, "runs/sft-1/")
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "adapter/prompt_format.json", "adapter/README.md", "metrics.json", "metrics.jsonl", "run.json", "_SUCCESS",
                 "generations.jsonl", "generations.md", "loss.png"):
        assert f"runs/sft-1/{name}" in got
    assert not [k for k in got if "/checkpoints/" in k]  # removed once the run is complete
    logs = json_lines(r.stderr)
    assert any(l.get("event") == "metrics" and l.get("step") == 1 for l in logs)  # one JSON line per logging step
    assert any("checkpoint checkpoint-3 uploaded" in l.get("msg", "") for l in logs)

    out = download(s3, "runs/sft-1/", tmp_path / "sft")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0 and metrics["eval_loss"] is not None
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "succeeded" and run["config"]["hf_token"] == "***"
    assert run["inputs"]["train"]["sha256"][f"s3://{s3.bucket}/data/sft/train.jsonl"]
    assert run["inputs"]["base_model"]["files"]["model.safetensors"]["etag"]
    assert run["versions"]["trl"] and run["prompt_format"] == "instruction"
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 6

    r = run_job(env_for(s3, tmp_path, JOB_STAGE="dpo", JOB_DATA=f"s3://{s3.bucket}/data/preferences.csv", JOB_RUN_ID="dpo-1",
                        JOB_ADAPTER=f"s3://{s3.bucket}/runs/sft-1/adapter/", JOB_TRAIN__MAX_STEPS="4"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = download(s3, "runs/dpo-1/", tmp_path / "dpo")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["reward_accuracy"] is not None and metrics["reward_margin"] is not None
    # Run averages, not the last logging window: they agree with the trainer's own mean loss and with the per-step rows.
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_loss"] == pytest.approx(next(r["train_loss"] for r in rows if "train_loss" in r), rel=1e-3)
    steps = [r for r in rows if "rewards/accuracies" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # JOB_TRAIN__LOGGING_STEPS=1 here
    assert metrics["reward_accuracy"] == pytest.approx(sum(r["rewards/accuracies"] for r in steps) / 4)
    assert metrics["reward_accuracy_last"] == steps[-1]["rewards/accuracies"]
    assert json.loads((out / "run.json").read_text())["prompt_format"] == "instruction"  # carried over from SFT
    assert_no_secret(s3, "runs/", r.stdout, r.stderr)

    # What a user does next: load the uploaded adapter on the base model; it must change the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": "日本の首都はどこですか？"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter")
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_bad_data_fails_with_exit_3_and_uploads_nothing(bucket, tmp_path):
    s3 = bucket
    s3.put_object(Bucket=s3.bucket, Key="data/bad.jsonl", Body='{"text": "Q", "output": "A"}\n{"text": "Q2"}\n'.encode())
    r = run_job(env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/bad.jsonl", JOB_RUN_ID="bad"))
    assert r.returncode == ExitCode.DATA
    assert f"s3://{s3.bucket}/data/bad.jsonl: row 2: missing field 'output'" in r.stderr
    assert "Traceback" not in r.stderr
    assert keys(s3, s3.bucket, "runs/") == []
    assert not (tmp_path / "work" / "bad" / "model").exists()  # failed before the model was downloaded


def test_missing_input_and_bad_credentials_are_classified(bucket, tmp_path):
    s3 = bucket
    r = run_job(env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/nothing.jsonl"))
    assert r.returncode == ExitCode.DATA and "no such object" in r.stderr
    env = env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/sft/")
    env["JOB_BASE_MODEL"] = f"s3://{s3.bucket}/models/none/"
    r = run_job(env)
    assert r.returncode == ExitCode.MODEL and f"JOB_BASE_MODEL: s3://{s3.bucket}/models/none/" in r.stderr, r.stderr[-2000:]
    env = env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/sft/")
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens: a network failure, worth retrying
    r = run_job(env)
    assert r.returncode == ExitCode.TRANSIENT, r.stderr[-2000:]


def test_sigterm_uploads_a_checkpoint_and_a_retry_resumes(bucket, tmp_path):
    s3 = bucket
    env = env_for(s3, tmp_path, JOB_STAGE="sft", JOB_DATA=f"s3://{s3.bucket}/data/sft/", JOB_RUN_ID="spot",
                  JOB_TRAIN__MAX_STEPS="400", JOB_TRAIN__SAVE_STEPS="0", JOB_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stderr:  # wait until training is under way, then reclaim the "spot node"
        lines.append(line)
        if '"event": "metrics"' in line and '"step": 3,' in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == ExitCode.PREEMPTED, rest[-3000:]
    done = [k for k in keys(s3, s3.bucket, "runs/spot/") if k.endswith("/_COMPLETE")]
    assert len(done) == 1 and "_SUCCESS" not in str(keys(s3, s3.bucket, "runs/spot/"))
    step = int(done[0].split("checkpoint-")[1].split("/")[0])
    assert 3 <= step < 400

    # The Job's next pod: same run id, fresh disk. It continues from the checkpoint and finishes.
    env["JOB_WORKDIR"] = str(tmp_path / "work2")
    env["JOB_TRAIN__MAX_STEPS"] = str(step + 2)
    r = run_job(env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/spot/run.json")["Body"].read())
    metrics = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/spot/metrics.json")["Body"].read())
    assert run["resumed_from"] == f"checkpoint-{step}" and metrics["steps"] == step + 2

    # A third start of the same run id (a late retry, a CI re-run) does nothing and succeeds.
    r = run_job(env)
    assert r.returncode == 0 and "already succeeded" in r.stderr

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
    return job_env(**{
        **s3.env,
        "HF_TOKEN": FAKE_SECRET,
        "JOB_BASE_MODEL": f"s3://{s3.bucket}/models/tiny/",
        "JOB_OUTPUT": f"s3://{s3.bucket}/runs",
        "JOB_WORKDIR": str(tmp_path / "work"),
        "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "1",
        "JOB_TRAIN__LOGGING_STEPS": "1",
        "JOB_TRAIN__LEARNING_RATE": "5e-3",
        "JOB_TRAIN__MAX_LENGTH": "128",
        **extra,
    })


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
    # Where the wall time went (job/phases.py), from the interpreter's start: every phase of a run that downloaded,
    # loaded, trained and wrote, in order, adding up to no more than the run's wall time plus its imports.
    ph = run["phases_s"]
    assert list(ph) == ["imports", "checks", "libraries", "preflight", "weights", "load", "trainer", "before", "first_step",
                        "train", "after", "write"]
    # The training stack is imported after the checks that need none of it (torch alone takes longer than 0.5 s).
    assert all(v >= 0 for v in ph.values()) and ph["libraries"] > 0.5 and ph["train"] > 0
    assert sum(ph.values()) - ph["imports"] <= run["wall_time_s"] + 0.1
    done = next(l for l in logs if l.get("event") == "done")
    assert list(done["phases_s"]) == [*ph, "publish"] and done["phases_s"]["publish"] > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 6

    r = run_job(env_for(s3, tmp_path, JOB_STAGE="dpo", JOB_DATA=f"s3://{s3.bucket}/data/preferences.csv", JOB_RUN_ID="dpo-1",
                        JOB_ADAPTER=f"s3://{s3.bucket}/runs/sft-1/adapter/", JOB_TRAIN__MAX_STEPS="4", JOB_EVAL_FRACTION="0.25"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = download(s3, "runs/dpo-1/", tmp_path / "dpo")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["reward_accuracy"] is not None and metrics["reward_margin"] is not None
    assert metrics["padding_free"] is True  # the default (JOB_TRAIN__PACKING): job/padfree.py, training and eval
    fast = metrics["fast_paths"]  # job/fastpaths.py's table, as the run used it
    assert fast["padding_free_dpo"]["on"] and fast["packed_attention"]["on"] and fast["lean_lora"]["why"]
    assert set(fast) == {"packed_attention", "padding_free_dpo", "lean_lora", "dequantized_copy", "offloaded_checkpoints"}
    # Run averages, not the last logging window: they agree with the trainer's own mean loss and with the per-step rows.
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_loss"] == pytest.approx(next(r["train_loss"] for r in rows if "train_loss" in r), rel=1e-6)
    steps = [r for r in rows if "rewards/accuracies" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # JOB_TRAIN__LOGGING_STEPS=1 here
    assert metrics["reward_accuracy"] == pytest.approx(sum(r["rewards/accuracies"] for r in steps) / 4)
    assert metrics["reward_accuracy_last"] == steps[-1]["rewards/accuracies"]
    # Held-out pairs: reward accuracy, margin and log-probs of the trained adapter on pairs it never saw.
    assert 0 <= metrics["eval_reward_accuracy"] <= 1 and metrics["eval_reward_margin"] is not None
    assert metrics["eval_logps_chosen"] < 0 and metrics["eval_logps_rejected"] < 0
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
    env["AWS_MAX_ATTEMPTS"] = "2"  # the job's default rides out ~33 s of outage; the classification is the same
    r = run_job(env)
    assert r.returncode == ExitCode.TRANSIENT, r.stderr[-2000:]


def _adapter_on_s3(s3, tiny_model, tmp_path, prefix):
    """A LoRA adapter with non-zero weights (what an SFT run leaves), uploaded as JOB_ADAPTER."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    upload_dir(s3, s3.bucket, tmp_path / "adapter", prefix)
    return f"s3://{s3.bucket}/{prefix}/"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigterm_checkpoints_and_the_resumed_run_equals_the_uninterrupted_one(bucket, tiny_model, tmp_path, stage):
    s3 = bucket
    extra = {"JOB_DATA": f"s3://{s3.bucket}/data/sft/"} if stage == "sft" else {
        "JOB_DATA": f"s3://{s3.bucket}/data/preferences.csv", "JOB_ADAPTER": _adapter_on_s3(s3, tiny_model, tmp_path, "adapters/a")}
    env = env_for(s3, tmp_path, JOB_STAGE=stage, JOB_TRAIN__MAX_STEPS="12", JOB_TRAIN__SAVE_STEPS="0",
                  JOB_TRAIN__LOGGING_STEPS="5", JOB_LOG_FORMAT="json", **extra)
    r = run_job({**env, "JOB_RUN_ID": "whole", "JOB_WORKDIR": str(tmp_path / "w0")})
    assert r.returncode == 0, r.stderr[-3000:]

    env = {**env, "JOB_RUN_ID": "spot"}
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    for line in proc.stderr:  # wait until training is under way, then reclaim the "spot node"
        if '"event": "metrics"' in line and '"step": 1,' in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == ExitCode.PREEMPTED, rest[-3000:]
    done = [k for k in keys(s3, s3.bucket, "runs/spot/") if k.endswith("/_COMPLETE")]
    assert len(done) == 1 and "_SUCCESS" not in str(keys(s3, s3.bucket, "runs/spot/"))
    step = int(done[0].split("checkpoint-")[1].split("/")[0])
    assert 1 <= step < 12

    # The Job's next pod: same run id, same config, fresh disk. It continues from the checkpoint and finishes.
    r = run_job({**env, "JOB_WORKDIR": str(tmp_path / "w2")})
    assert r.returncode == 0, r.stderr[-3000:]
    whole, spot = download(s3, "runs/whole/", tmp_path / "whole"), download(s3, "runs/spot/", tmp_path / "spot")
    assert json.loads((spot / "run.json").read_text())["resumed_from"] == f"checkpoint-{step}"

    from safetensors.torch import load_file

    a, b = load_file(whole / "adapter" / "adapter_model.safetensors"), load_file(spot / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and {v.dtype for v in a.values()} == {v.dtype for v in b.values()} == {torch.float32}
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any((a[k] - load_file(tmp_path / "adapter" / "adapter_model.safetensors")[k]).abs().max() > 0 for k in a) \
        if stage == "dpo" else True  # and the DPO run did train the continued adapter

    ma, mb = json.loads((whole / "metrics.json").read_text()), json.loads((spot / "metrics.json").read_text())
    for key in ("steps", "tokens", "train_loss", "train_loss_last") + (("reward_accuracy", "reward_margin") if stage == "dpo" else ()):
        assert mb[key] == pytest.approx(ma[key], rel=1e-6, abs=1e-9), key
    assert mb["session"]["resumed_from_step"] == step and mb["session"]["steps"] == 12 - step
    assert ma["session"]["tokens"] == ma["tokens"] and 0 < mb["session"]["tokens"] < mb["tokens"]
    rows = [json.loads(line) for line in (spot / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    # Every step is in exactly one logged window, across both sessions: 1, the checkpoint, every 5th, the last.
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 12 and step in steps

    # A third start of the same run id (a late retry, a CI re-run) does nothing and succeeds.
    r = run_job({**env, "JOB_WORKDIR": str(tmp_path / "w3")})
    assert r.returncode == 0 and "already succeeded" in r.stderr

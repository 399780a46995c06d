"""Run identity: a JOB_RUN_ID stands for one stage, config, data and model. Reusing it for anything else is refused
(exit 2, naming JOB_RUN_ID and what differs) instead of being skipped or resumed from the wrong checkpoint;
JOB_RESTART=true is the documented way to start over. Plus the OOM fallback of `auto` gradient checkpointing and a
quiet Ctrl-C before the job starts."""

import json
import shutil
import signal
import subprocess
import sys

import pytest

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, ROOT, job_env, plan_as_on_a_big_gpu, run_job


@pytest.fixture
def env(tiny_model, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_bytes((DEMO_DATA / "sft.jsonl").read_bytes())
    return job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(data), JOB_OUTPUT=str(tmp_path / "out"),
                   JOB_WORKDIR=str(tmp_path / "w"), JOB_RUN_ID="r1", JOB_TRAIN__MAX_STEPS="2", JOB_TRAIN__MAX_LENGTH="128",
                   JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_LOG_FORMAT="json")


def test_a_run_id_means_one_stage_config_data_and_model(env, tmp_path):
    out = tmp_path / "out" / "r1"
    r = run_job(env)
    assert r.returncode == 0, r.stderr[-3000:]
    identity = json.loads((out / "identity.json").read_text())
    assert identity["stage"] == "sft" and identity["sha256"] == json.loads((out / "run.json").read_text())["identity_sha256"]
    success = (out / "_SUCCESS").read_text()

    r = run_job(env)  # the same run again (a late retry, a CI re-run): nothing to do
    assert r.returncode == 0 and "already succeeded" in r.stderr

    refused = {
        "another stage": ({"JOB_STAGE": "dpo", "JOB_DATA": str(DEMO_DATA / "dpo.csv")}, "JOB_STAGE sft -> dpo"),
        "another config": ({"JOB_TRAIN__LEARNING_RATE": "1e-3"}, "JOB_TRAIN__LEARNING_RATE 0.0002 -> 0.001"),
        "another LoRA rank": ({"JOB_LORA__R": "8"}, "JOB_LORA__R 16 -> 8"),
        "another LoRA variant": ({"JOB_LORA__USE_DORA": "true"}, "JOB_LORA__USE_DORA None -> True"),
        "another LoRA init": ({"JOB_LORA__INIT_LORA_WEIGHTS": "gaussian"}, "JOB_LORA__INIT_LORA_WEIGHTS None -> 'gaussian'"),
        "LoRA+": ({"JOB_TRAIN__LORAPLUS_LR_RATIO": "16"}, "JOB_TRAIN__LORAPLUS_LR_RATIO None -> 16.0"),
    }
    for what, (change, says) in refused.items():
        r = run_job({**env, **change})
        assert r.returncode == ExitCode.CONFIG, (what, r.stderr[-2000:])
        assert "JOB_RUN_ID=r1: this run id was used for another run" in r.stderr and says in r.stderr, (what, r.stderr[-2000:])
        assert "JOB_RESTART=true" in r.stderr and "Traceback" not in r.stderr
    original = (tmp_path / "sft.jsonl").read_text(encoding="utf-8")
    (tmp_path / "sft.jsonl").write_text(original.replace("東京", "京都"), encoding="utf-8")
    r = run_job(env)
    assert r.returncode == ExitCode.CONFIG and "the data's content" in r.stderr
    assert (out / "_SUCCESS").read_text() == success  # nothing of the first run was touched

    # Operational settings may change between attempts of one run: the identity ignores them.
    (tmp_path / "sft.jsonl").write_text(original, encoding="utf-8")
    r = run_job({**env, "JOB_TRAIN__LOGGING_STEPS": "1", "JOB_TRAIN__SAVE_STEPS": "7", "JOB_WORKDIR": str(tmp_path / "w2"),
                 "JOB_TRAIN__MERGE_MICRO_BATCHES": "true",  # how a step is split, not what it computes
                 "JOB_LORA__USE_RSLORA": "false", "JOB_LORA__INIT_LORA_WEIGHTS": "true"})  # PEFT's defaults: the same run
    assert r.returncode == 0 and "already succeeded" in r.stderr

    # The documented override: start over with the new data.
    (tmp_path / "sft.jsonl").write_text(original.replace("東京", "京都"), encoding="utf-8")
    r = run_job({**env, "JOB_RESTART": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "discarding everything stored for run r1" in r.stderr
    assert json.loads((out / "identity.json").read_text())["sha256"] != identity["sha256"]


def test_an_interrupted_run_id_is_not_continued_by_another_stage(env, tmp_path):
    """An SFT run stopped with checkpoints in storage; a DPO run given its run id must not resume from them."""
    out = tmp_path / "out" / "r1"
    r = run_job({**env, "JOB_TRAIN__SAVE_STEPS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "_SUCCESS").unlink()  # as if the pod had been reclaimed before publishing
    r = run_job({**env, "JOB_STAGE": "dpo", "JOB_DATA": str(DEMO_DATA / "dpo.csv")})
    assert r.returncode == ExitCode.CONFIG and "JOB_STAGE sft -> dpo" in r.stderr
    assert not (out / "_SUCCESS").exists()
    r = run_job(env, "--check")
    assert r.returncode == 0 and json.loads(r.stdout)["run"].startswith("continues this run id")


def test_oom_with_checkpointing_off_starts_again_with_it_on(tiny_model, tmp_path, monkeypatch, caplog):
    """`auto` estimated that activations fit (checkpointing off), the GPU said otherwise: the run starts again with
    checkpointing on and succeeds. With it already on, the error names the settings to lower (exit 5)."""
    import torch
    from trl import SFTTrainer

    from job import pipeline
    from job.errors import OutOfMemory
    from job.settings import load_settings

    # What `auto` decides on a big GPU (off); an explicit setting is kept.
    plan_as_on_a_big_gpu(monkeypatch)
    real_step = SFTTrainer.training_step

    def step(self, *a, **kw):  # activations of this micro-batch don't fit without checkpointing
        if not self.args.activation_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "training_step", step)
    base = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(DEMO_DATA / "sft.jsonl"),
            "JOB_OUTPUT": str(tmp_path / "out"), "JOB_WORKDIR": str(tmp_path / "w"), "JOB_TRAIN__MAX_STEPS": "2",
            "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__MAX_LENGTH": "128", "JOB_EVAL_MAX_NEW_TOKENS": "16"}
    out = pipeline.run(load_settings({**base, "JOB_RUN_ID": "auto"}))
    assert (tmp_path / "out" / "auto" / "_SUCCESS").exists() and out.endswith("auto")
    assert any("starting again with it on" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(SFTTrainer, "training_step", lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(OutOfMemory) as e:
        pipeline.run(load_settings({**base, "JOB_RUN_ID": "on", "JOB_TRAIN__GRADIENT_CHECKPOINTING": "true"}))
    assert "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE (now 4" in str(e.value) and "JOB_TRAIN__MAX_LENGTH (now 128)" in str(e.value)
    assert e.value.exit_code == ExitCode.OOM and not (tmp_path / "out" / "on" / "_SUCCESS").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.PREEMPTED)])
def test_a_signal_while_the_job_is_starting_stops_it_quietly(sig, code, tmp_path):
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tmp_path), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                  JOB_OUTPUT=str(tmp_path / "o"), JOB_WORKDIR=str(tmp_path / "w"), JOB_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "job", "--check"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # The data is checked (its log line) in well under a second; then the job imports torch, transformers and TRL
    # (seconds, --check needs them), and (tmp_path holding no model) would fail at the model's check after that.
    first = proc.stderr.readline()
    assert '"msg": "data: 24 training' in first, first
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and signal.Signals(sig).name in err


def test_restart_happens_once_per_restart_key(env, tmp_path):
    """JOB_RESTART=true left in a Kubernetes Job spec wiped the checkpoints on every pod retry. Now a restart is done
    once per JOB_RESTART_KEY (the manifests set the Job's uid): a retry with the same key continues the run."""
    out = tmp_path / "out" / "r1"
    first = {**env, "JOB_RESTART": "true", "JOB_RESTART_KEY": "job-uid-1", "JOB_TRAIN__SAVE_STEPS": "1", "JOB_EVAL_PROMPTS": "none",
             "JOB_KEEP_WORKDIR": "true"}  # the test copies a local checkpoint back as the reclaimed pod would have left it
    r = run_job(first)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "discarding everything stored for run r1" in r.stderr
    assert json.loads((out / "restarted.json").read_text())["key"] == "job-uid-1"
    # As if the pod had been reclaimed after its last checkpoint, before publishing: Kubernetes retries it, same env.
    (out / "_SUCCESS").unlink()
    shutil.copytree(tmp_path / "w" / "r1" / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    r = run_job(first)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "discarding" not in r.stderr and "JOB_RESTART=true already done for JOB_RESTART_KEY=job-uid-1" in r.stderr
    assert "resuming from" in r.stderr and (out / "_SUCCESS").exists()  # the retry continued from the checkpoint
    # A new Job (a new key) with JOB_RESTART=true does start over: --check says so, and discards nothing itself.
    r = run_job({**first, "JOB_RESTART_KEY": "job-uid-2"}, "--check")
    assert r.returncode == 0 and "would be discarded first" in json.loads(r.stdout)["run"]
    assert (out / "_SUCCESS").exists()


def test_a_setting_added_later_leaves_the_identity_of_runs_that_do_not_set_it_as_it_was():
    """A spot run recorded by an older image, retried on a newer one, is still the same run: an SFT run with the
    default settings has the fingerprint it had at 92e1107 (computed there with this same call), although settings
    were added since (JOB_TRAIN__LORAPLUS_LR_RATIO, JOB_LORA__<FIELD>, JOB_RESTART_KEY, ...). Control: the same
    identity with the new LoRA+ field kept as null has another fingerprint."""
    from job import preflight
    from job.settings import load_settings

    class Inputs:
        identity = {}

    models = {"base_model": {"uri": "x"}, "adapter": None}
    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o"})
    ident = preflight.identity(s, Inputs(), models)
    assert ident["sha256"] == "b1be5446b43b45e9c5e16c02cb7f58b4a6112af95cac82a2a935b8eb521e7e5d"
    with_null = dict(ident, config=dict(ident["config"], train=dict(ident["config"]["train"], loraplus_lr_ratio=None)))
    assert preflight.fingerprint(with_null) != ident["sha256"]
    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o",
                       "JOB_TRAIN__LORAPLUS_LR_RATIO": "16"})
    assert preflight.identity(s, Inputs(), models)["config"]["train"]["loraplus_lr_ratio"] == 16

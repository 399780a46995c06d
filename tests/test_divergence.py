"""Training that diverged fails (exit 6) and keeps the last good checkpoint; one that stopped learning says so
(job/divergence.py). Through `python -m job` on the tiny model, a few steps each."""

import json
import math

from job.divergence import training_warnings
from job.exitcodes import ExitCode

from conftest import DEMO_DATA, json_lines, job_env, run_job


def _env(tiny_model, tmp_path, lr: str, steps: int, **extra) -> dict:
    return job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                   JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"), JOB_RUN_ID="r", JOB_LOG_FORMAT="json",
                   JOB_TRAIN__LEARNING_RATE=lr, JOB_TRAIN__WARMUP_RATIO="0", JOB_TRAIN__LR_SCHEDULER_TYPE="constant",
                   JOB_TRAIN__MAX_STEPS=str(steps), JOB_TRAIN__LOGGING_STEPS="1", JOB_TRAIN__MAX_LENGTH="128",
                   JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1",
                   JOB_EVAL_PROMPTS="none", **extra)


def test_a_diverged_run_exits_6_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    # 1e30: step 1's update leaves huge but finite weights (checkpoint-1 is saved), step 2's are NaN. Before: exit 0,
    # _SUCCESS, 28 NaN adapter tensors and a log that showed the NaN losses as 0.0.
    r = run_job(_env(tiny_model, tmp_path, "1e30", 4, JOB_TRAIN__SAVE_STEPS="1"))
    assert r.returncode == ExitCode.DIVERGED, r.stderr[-3000:]
    [error] = [e for e in json_lines(r.stderr) if e.get("event") == "error"]
    assert error["exit_code"] == ExitCode.DIVERGED and "Traceback" not in r.stderr
    assert "training diverged at step 2" in error["msg"] and "JOB_TRAIN__LEARNING_RATE (now 1e+30)" in error["msg"]
    run = tmp_path / "out" / "r"
    assert not (run / "_SUCCESS").exists() and not (run / "adapter").exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["checkpoint-1"] and (run / "checkpoints" / "checkpoint-1" / "_COMPLETE").exists()
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())  # what a retry would resume from is good


def test_a_collapsed_run_succeeds_with_a_loud_warning(tiny_model, tmp_path):
    # 2e4 (a typo for 2e-4): the tiny model collapses after two steps, gradient norm 0 from then on.
    r = run_job(_env(tiny_model, tmp_path, "2e4", 5, JOB_TRAIN__SAVE_STEPS="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "r" / "metrics.json").read_text())
    [warning] = [w for w in metrics["warnings"] if "gradient norm was 0" in w]
    assert "JOB_TRAIN__LEARNING_RATE (now 20000)" in warning
    assert any(e.get("event") == "training_warning" and e["msg"] == warning for e in json_lines(r.stderr))
    assert f"  WARNING: {warning}" in r.stdout  # the closing summary


def test_training_warnings_from_the_log_rows():
    rows = lambda *pairs: [{"step": i + 1, "loss": loss, "grad_norm": g} for i, (loss, g) in enumerate(pairs)]  # noqa: E731
    assert training_warnings(rows((2.0, 1.0), (1.5, 0.5), (1.0, 0.2)), 2e-4) == []
    [up] = training_warnings(rows((1.0, 1.0), (0.8, 0.5), (1.2, 0.4)), 2e-4)
    assert "ended above where it started (1 at step 1 -> 1.2 at step 3)" in up and "JOB_TRAIN__LEARNING_RATE (now 0.0002)" in up
    # Two rows of 0 are not yet a pattern; three are, and the longest run is reported from its first step.
    assert training_warnings(rows((3, 1), (2, 0.0), (2, 0.0), (1, 0.1)), 1.0) == []
    [flat] = training_warnings(rows((3, 1), (2, 0.0), (1, 0.3), (1, 0.0), (1, 0.0), (1, 0.0)), 1.0)
    assert "0 in 3 consecutive log rows (from step 4)" in flat
    assert training_warnings([{"step": 1, "loss": math.nan}], 1.0) == []  # a NaN is Diverged's business, not a warning


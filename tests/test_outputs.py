"""metrics.json figures: what a user reads after a run, checked against real trainers (tiny model, 4-bit, CPU)."""

import pytest

from job import sequences
from job.data import load_records
from job.model import load_base_model, load_tokenizer
from job.outputs import MetricsCallback, final_metrics, run_mean
from job.settings import ColumnSettings
from job.stages import dpo, sft

from conftest import DEMO_DATA
from test_stages import settings


def test_run_averages_weight_each_log_row_by_the_steps_it_covers():
    # logging_first_step, then every 10 steps, then a last partial window; eval rows and the summary row ignored.
    history = [{"step": 1, "loss": 1.0}, {"step": 10, "loss": 0.5}, {"step": 10, "eval_loss": 9.0},
               {"step": 20, "loss": 0.25}, {"step": 25, "loss": 0.1}, {"step": 25, "train_loss": 0.4}]
    assert run_mean(history, "loss") == pytest.approx((1.0 + 9 * 0.5 + 10 * 0.25 + 5 * 0.1) / 25)
    assert run_mean(history, "rewards/accuracies") is None


def _train(tiny_model, tmp_path, stage, callbacks):
    """7 steps with a log row every 5: the last 2 steps are a partial window transformers does not log by itself."""
    s = settings(tiny_model, tmp_path, stage, JOB_TRAIN__MAX_STEPS="7", JOB_TRAIN__LOGGING_STEPS="5",
                 JOB_TRAIN__LEARNING_RATE="5e-3", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
                 JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__MAX_LENGTH="128")
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    name = "sft.jsonl" if stage == "sft" else "dpo.csv"
    records = load_records(DEMO_DATA / name, name, stage, ColumnSettings())
    rows = sequences.fit(records, stage, tok, max_length=128, policy="cut_prompt", stops={tok.eos_token_id}, role="train").rows
    module = sft if stage == "sft" else dpo
    trainer = module.build_trainer(s, load_base_model(tiny_model, s), tok, rows, None, tmp_path / "ck", callbacks, progress_bar=False)
    return trainer, trainer.train()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_train_loss_is_the_trainers_own_and_the_last_window_counts(tiny_model, tmp_path, stage):
    trainer, result = _train(tiny_model, tmp_path, stage, [MetricsCallback(emit=False)])
    m = final_metrics(stage, trainer, result, None, lengths={})
    assert m["steps"] == 7
    assert m["train_loss"] == pytest.approx(result.training_loss, rel=1e-6)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in rows] == [1, 5, 7]  # the final partial window has its row
    assert m["train_loss_last"] == rows[-1]["loss"]
    if stage == "dpo":
        assert m["reward_accuracy"] == pytest.approx((rows[0]["rewards/accuracies"] + 4 * rows[1]["rewards/accuracies"]
                                                      + 2 * rows[2]["rewards/accuracies"]) / 7, rel=1e-6)
        assert m["reward_accuracy_last"] == rows[-1]["rewards/accuracies"] and m["reward_margin_last"] == rows[-1]["rewards/margins"]
        assert m["pairs_per_second"] > 0 and m["session"]["pairs"] == 14  # 7 steps x 2 pairs
    assert m["tokens"] == rows[-1]["num_tokens"] > 0 and m["session"]["tokens"] == m["tokens"]


def test_control_without_the_final_row_the_run_average_is_wrong(tiny_model, tmp_path):
    """What metrics.json reported before: transformers alone logs steps 1 and 5, so the run average misses steps 6-7."""
    trainer, result = _train(tiny_model, tmp_path, "sft", [])
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in rows] == [1, 5]
    assert run_mean(rows, "loss") != pytest.approx(result.training_loss, rel=1e-6)

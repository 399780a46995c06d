"""metrics.json figures: what a user reads after a run."""

import pytest

from job.outputs import run_mean


def test_run_averages_weight_each_log_row_by_the_steps_it_covers():
    # logging_first_step, then every 10 steps, then a last partial window; eval rows and the summary row ignored.
    history = [{"step": 1, "loss": 1.0}, {"step": 10, "loss": 0.5}, {"step": 10, "eval_loss": 9.0},
               {"step": 20, "loss": 0.25}, {"step": 25, "loss": 0.1}, {"step": 25, "train_loss": 0.4}]
    assert run_mean(history, "loss") == pytest.approx((1.0 + 9 * 0.5 + 10 * 0.25 + 5 * 0.1) / 25)
    assert run_mean(history, "rewards/accuracies") is None

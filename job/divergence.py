"""Training that went wrong without an error: a run that diverged must fail, one that stopped learning must say so.

- **Diverged** (exit 6, job/exitcodes.py): a non-finite loss or gradient norm in a log row, or a non-finite trainable
  (adapter) weight, ends the run at once, naming the step and `JOB_TRAIN__LEARNING_RATE`. The weights are checked at
  every step that logs or saves, before the trainer saves (on_step_end runs before the save), so no checkpoint with
  NaN weights is uploaded and the last good one is kept; and once more before the adapter is written.
- **Suspicious** (warnings in the log, the closing summary and `metrics.json`'s `warnings`): a training loss that ends
  above where it started, or a gradient norm of 0 in VANISHED_ROWS consecutive log rows (a model collapsed by a
  learning rate like `2e4`, a typo for `2e-4`, keeps a constant loss and learns nothing).

    >>> callbacks.append(DivergenceCallback(settings.train.learning_rate))
    >>> check_weights(trainer.model, trainer.state.global_step, settings.train.learning_rate)   # raises Diverged
    >>> training_warnings(trainer.state.log_history, settings.train.learning_rate)
    []
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

from job.errors import Diverged

log = logging.getLogger("job")

#: Consecutive log rows with a gradient norm of 0 that make a warning.
VANISHED_ROWS = 3


def _finite(v) -> bool:
    return not isinstance(v, (int, float)) or math.isfinite(v)


def _hint(lr: float) -> str:
    return f"lower JOB_TRAIN__LEARNING_RATE (now {lr:g})"


def check_weights(model, step: int, lr: float) -> None:
    """Raise Diverged when a trainable weight is NaN or infinite (one device sync for all of them)."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return
    ok = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(ok.all()):
        return
    bad = [n for (n, _), good in zip(named, ok.tolist()) if not good]
    raise Diverged(f"training diverged at step {step}: {len(bad)} of {len(named)} adapter tensors hold NaN or infinite "
                   f"values (first: {bad[0]}); {_hint(lr)}. Nothing was marked successful; the last uploaded "
                   "checkpoint (if any) is from before the divergence")


class DivergenceCallback(TrainerCallback):
    """Ends training with Diverged on a non-finite loss, gradient norm or weight (see the module docstring). Placed
    after the callbacks that decide to log or save, so that it sees their decisions."""

    def __init__(self, learning_rate: float):
        self.lr = learning_rate

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (control.should_log or control.should_save or state.global_step >= state.max_steps):
            check_weights(model, state.global_step, self.lr)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            if logs and key in logs and not _finite(logs[key]):
                raise Diverged(f"training diverged at step {state.global_step}: {key} is {logs[key]}; {_hint(self.lr)}. "
                               "Nothing was marked successful; the last uploaded checkpoint (if any) is from before "
                               "the divergence")
        return control


def training_warnings(history: list[dict], lr: float) -> list[str]:
    """What the finished run's log rows say is suspicious, in words for the log, the summary and metrics.json."""
    rows = [h for h in history if "step" in h and "loss" in h]
    out = []
    if len(rows) >= 2 and rows[-1]["loss"] > rows[0]["loss"]:
        out.append(f"the training loss ended above where it started ({rows[0]['loss']:.4g} at step {rows[0]['step']} "
                   f"-> {rows[-1]['loss']:.4g} at step {rows[-1]['step']}): the model did not learn; "
                   f"check the data, or {_hint(lr)}")
    run = longest = 0
    start = first = None
    for h in rows:
        run = run + 1 if h.get("grad_norm") == 0 else 0
        start = h["step"] if run == 1 else start
        if run > longest:
            longest, first = run, start
    if longest >= VANISHED_ROWS:
        out.append(f"the gradient norm was 0 in {longest} consecutive log rows (from step {first}): the model stopped "
                   f"learning, as one collapsed by too high a learning rate does; {_hint(lr)}")
    return out

"""Training progress where platforms look for it.

- Log lines: each JSON `metrics` line carries `step`, `total_steps` and `eta_s` (seconds left), so `kubectl logs`,
  a log pipeline or a CI job shows how far a run is without parsing a progress bar (outputs.MetricsCallback).
- Kubeflow Trainer: a TrainJob's controller (Trainer v2.2+, feature gate TrainJobStatus) injects
  KUBEFLOW_TRAINER_SERVER_URL and a token file into the trainer container, and transformers' `KubeflowCallback`
  posts progress, ETA and the logged metrics there; they appear in the TrainJob's `status.trainerStatus`. Nothing to
  do here: transformers (5.24, the oldest the job supports) adds "kubeflow" to `report_to` itself whenever that
  variable is set, JOB_TRAIN__REPORT_TO=none included (TrainingArguments.__post_init__); tests/test_progress.py
  checks that it still does, through the job's own training arguments and end to end.
"""

from __future__ import annotations

import time


class Eta:
    """Seconds left in training, from the mean time per step since this process began training: a resumed run counts
    only the steps it ran itself, not the time its predecessor spent."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._start: tuple[int, float] | None = None

    def start(self, step: int) -> None:
        self._start = (step, self._clock())

    def fields(self, step: int, total_steps: int) -> dict:
        """`total_steps`, and `eta_s` once a step has been timed."""
        out = {"total_steps": total_steps}
        if self._start is not None and total_steps > 0 and step > self._start[0]:
            per_step = (self._clock() - self._start[1]) / (step - self._start[0])
            out["eta_s"] = round(per_step * max(total_steps - step, 0), 1)
        return out

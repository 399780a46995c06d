"""Training progress where platforms look for it.

- Log lines: each JSON `metrics` line carries `step`, `total_steps` and `eta_s` (seconds left), so `kubectl logs`,
  a log pipeline or a CI job can show how far a run is without parsing a progress bar.
- Kubeflow Trainer: a TrainJob's controller (Trainer v2.2+, feature gate TrainJobStatus) injects
  KUBEFLOW_TRAINER_SERVER_URL and a token into the trainer container; transformers' `KubeflowCallback` then posts
  progress, ETA and the logged metrics to it, and they appear in the TrainJob's `status.trainerStatus`. transformers
  only registers that callback for the integrations named in `report_to`, so `report_to()` adds it whenever it can
  run, whatever JOB_TRAIN__REPORT_TO says (`none` included).

    >>> report_to("none")            # inside a TrainJob with progress reporting on
    ['kubeflow']
"""

from __future__ import annotations

import time


def report_to(setting: str) -> list[str]:
    """JOB_TRAIN__REPORT_TO (`none` or comma-separated names) as TrainingArguments.report_to, plus `kubeflow` when the
    Kubeflow Trainer callback can run (transformers decides: KUBEFLOW_TRAINER_SERVER_URL is set and
    DISABLE_KUBEFLOW_INTEGRATION is not)."""
    from transformers.integrations import is_kubeflow_available

    names = [] if setting == "none" else [n for n in setting.split(",") if n]
    if is_kubeflow_available() and "kubeflow" not in names:
        names.append("kubeflow")
    return names


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

"""What a run leaves behind, under {JOB_OUTPUT}/{run_id}/:

    adapter/          PEFT adapter (safetensors), tokenizer with the prompt format as chat template,
                      prompt_format.json, README.md (model card)
    metrics.json      losses, SFT token accuracy, DPO reward accuracy/margin/log-probs (run averages, the last logging
                      window, and held-out), steps, tokens, this session's throughput, peak GPU memory, length policy
    metrics.jsonl     one line per logged step of the whole run (every save and the last step included)
    run.json          resolved config (secrets masked), versions, base model and data identity, times, status
    checkpoints/      the latest training checkpoint while the run is in progress (for resuming)
    _SUCCESS          written last, only when everything above is uploaded
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from importlib import metadata
from pathlib import Path

from transformers import TrainerCallback

from job import storage
from job.logs import redact

log = logging.getLogger("job.metrics")

PACKAGES = ("qlora-job", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsCallback(TrainerCallback):
    """Makes the trainer's log history complete, and emits each logging step as one JSON log line (no progress bar).

    transformers logs every LOGGING_STEPS steps and not at the last step, so the steps after the last multiple of
    LOGGING_STEPS are in no row; and a checkpoint saved between two log rows resumes without the rows of the steps
    before it. A log row at the last step and at every save closes both gaps: the history in the final checkpoint
    (trainer_state.json, restored on resume) then covers every step of the run exactly once, across sessions."""

    def __init__(self, emit: bool):
        self.emit = emit

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.emit and state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **{k: _clean(v) for k, v in logs.items()}}
            log.info("step %d", state.global_step, extra={"fields": {"event": "metrics", "max_steps": state.max_steps, **row}})


def write_history(path: Path, log_history: list[dict]) -> None:
    """metrics.jsonl: one line per logged step of the whole run (the trainer's history survives resumes)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in log_history:
            if "step" in row:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) + "\n")


def run_mean(history: list[dict], key: str) -> float | None:
    """A logged training metric averaged over the whole run. Each log row averages the steps since the previous row
    (the first row: step 1 alone), so rows are weighted by the steps they cover."""
    total = steps = 0.0
    prev = 0
    for h in history:
        if key in h and h.get("step") is not None and _clean(h[key]) is not None:
            n = max(h["step"] - prev, 0)
            total, steps, prev = total + h[key] * n, steps + n, h["step"]
    return round(total / steps, 6) if steps else None


def final_metrics(stage: str, trainer, train_result, eval_metrics: dict | None, *, lengths: dict) -> dict:
    """metrics.json. Run figures come from the trainer's log history, which covers every step of the run across
    resumes; throughput is this session's (the steps this process trained), labelled so."""
    import torch

    history = [h for h in trainer.state.log_history if "step" in h and "loss" in h]  # training rows, not eval/summary
    last = history[-1] if history else {}
    tm = train_result.metrics
    runtime = tm.get("train_runtime") or 0.0
    resumed = getattr(trainer, "job_resumed", {"step": 0, "tokens": 0})
    tokens = int(last.get("num_tokens") or 0)
    session_tokens = tokens - int(resumed["tokens"])
    session_steps = trainer.state.global_step - int(resumed["step"])
    out = {
        "stage": stage,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        # Averages over the whole run; *_last: the last logging window (at most JOB_TRAIN__LOGGING_STEPS steps).
        "train_loss": run_mean(history, "loss"),
        "train_loss_last": _clean(last.get("loss")),
        "eval_loss": _clean((eval_metrics or {}).get("eval_loss")),
        # Non-padding tokens trained on (TRL's num_tokens: prompt and answer, every epoch), the whole run.
        "tokens": tokens,
        # This session: the steps this process trained (all of them unless it resumed from a checkpoint).
        "session": {"resumed_from_step": int(resumed["step"]), "steps": session_steps, "tokens": session_tokens},
        "train_runtime_s": round(runtime, 3),
        "tokens_per_second": round(session_tokens / runtime, 2) if runtime and session_tokens else None,
        # TRL gathers num_tokens over all processes: the line above is the total, this one per GPU (or CPU process).
        "world_size": trainer.args.world_size,
        "tokens_per_second_per_device": round(session_tokens / runtime / trainer.args.world_size, 2) if runtime and session_tokens else None,
        "peak_gpu_memory_gib": None,
        "peak_gpu_memory_reserved_gib": None,
        # What the length policy did (job/sequences.py): examples kept, prompts cut, dropped, and the first rows of each.
        "length_policy": lengths,
    }
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if stage == "sft":
        out["mean_token_accuracy"] = run_mean(history, "mean_token_accuracy")
        out["mean_token_accuracy_last"] = _clean(last.get("mean_token_accuracy"))
        if eval_metrics:
            out["eval_mean_token_accuracy"] = _clean(eval_metrics.get("eval_mean_token_accuracy"))
    if stage == "dpo":
        for key, name in (("rewards/accuracies", "reward_accuracy"), ("rewards/margins", "reward_margin"),
                          ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
            out[name] = run_mean(history, key)
            out[f"{name}_last"] = _clean(last.get(key))
            if eval_metrics:
                out[f"eval_{name}"] = _clean(eval_metrics.get(f"eval_{key}"))
        # Pairs this session: each pair is a chosen and a rejected row; every process trains as many.
        pairs = getattr(trainer, "job_rows_seen", 0) // 2 * trainer.args.world_size
        out["session"]["pairs"] = pairs
        out["pairs_per_second"] = round(pairs / runtime, 4) if runtime and pairs else None
    return out


MODEL_CARD = """---
library_name: peft
base_model: {base}
tags: [qlora-job, {stage}, lora]
---
# {run_id} ({stage})

LoRA adapter trained by qlora-job on `{base}` with data `{data}`.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/adapter")      # carries the prompt format as its chat template
base = AutoModelForCausalLM.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base, "path/to/adapter")
ids = tok.apply_chat_template([{{"role": "user", "content": "質問"}}], add_generation_prompt=True, return_tensors="pt")
```

Prompt format: `{prompt_format}` (see prompt_format.json). Metrics: see metrics.json beside this folder.
"""


def write_adapter(dest: Path, model, tokenizer, prompt_format: str, *, base: str, data: str, run_id: str, stage: str) -> None:
    # Only the trained adapter: DPO's frozen "ref" copy is an implementation detail of training.
    model.save_pretrained(dest, selected_adapters=["default"], safe_serialization=True)
    tokenizer.save_pretrained(dest)
    example = tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}, {"role": "assistant", "content": "{answer}"}], tokenize=False
    )
    (dest / "prompt_format.json").write_text(
        json.dumps({"name": prompt_format, "chat_template": tokenizer.chat_template, "rendered_example": example}, ensure_ascii=False, indent=2),
        encoding="utf-8",
    )
    base_id = base.removeprefix("hf://").split("@")[0] if base.startswith("hf://") else base
    (dest / "README.md").write_text(
        MODEL_CARD.format(base=base, base_id=base_id, data=data, run_id=run_id, stage=stage, prompt_format=prompt_format), encoding="utf-8"
    )


def write_json(path: Path, data: dict) -> None:
    path.write_text(redact(json.dumps(data, ensure_ascii=False, indent=2, default=str)) + "\n", encoding="utf-8")


def publish(local: Path, remote: storage.Uri, token: str | None) -> None:
    """Upload everything, then `_SUCCESS` alone: its presence means every other file is complete."""
    storage.push(local, remote, token)
    marker = local.parent / "_SUCCESS"
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    storage.push(marker, remote.join("_SUCCESS"), token)

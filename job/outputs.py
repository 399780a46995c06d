"""What a run leaves behind, under {JOB_OUTPUT}/{run_id}/:

    adapter/          PEFT adapter (safetensors), tokenizer with the prompt format as chat template,
                      prompt_format.json, README.md (model card)
    metrics.json      losses and DPO reward accuracy/margin (run averages, and the last logging window), steps,
                      tokens, throughput, runtime, peak GPU memory
    metrics.jsonl     one line per logging step
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
    """Appends each logging step to metrics.jsonl, and emits it as one JSON log line when there is no progress bar."""

    def __init__(self, path: Path, emit: bool):
        self.path, self.emit = path, emit
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **{k: _clean(v) for k, v in logs.items()}}
        self.history.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.emit:
            log.info("step %d", state.global_step, extra={"fields": {"event": "metrics", **row}})


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


def final_metrics(stage: str, trainer, train_result, history: list[dict], eval_metrics: dict | None, wall_s: float) -> dict:
    import torch

    # The trainer's log history survives a resume (it is in the checkpoint); the callback's starts at the resume.
    history = [h for h in (getattr(trainer.state, "log_history", None) or history) if "step" in h] or history
    last_train = next((h for h in reversed(history) if "loss" in h), {})
    tm = train_result.metrics
    runtime = tm.get("train_runtime") or wall_s
    tokens = int(max((h.get("num_tokens") or 0 for h in history), default=0))
    out = {
        "stage": stage,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        # Averages over the run; *_last: the last logging window (JOB_TRAIN__LOGGING_STEPS steps).
        "train_loss": run_mean(history, "loss"),
        "train_loss_last": _clean(last_train.get("loss")),
        "eval_loss": _clean((eval_metrics or {}).get("eval_loss")),
        "train_runtime_s": round(runtime, 3),
        "train_samples_per_second": tm.get("train_samples_per_second"),
        # Non-padding tokens processed (TRL's num_tokens: prompt and answer, every epoch); per second of training.
        "tokens": tokens,
        "tokens_per_second": round(tokens / runtime, 2) if runtime and tokens else None,
        # TRL gathers num_tokens over all processes: the line above is the total, this one per GPU (or CPU process).
        "world_size": trainer.args.world_size,
        "tokens_per_second_per_device": round(tokens / runtime / trainer.args.world_size, 2) if runtime and tokens else None,
        "peak_gpu_memory_gib": None,
        "peak_gpu_memory_reserved_gib": None,
    }
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if stage == "dpo":
        out["reward_accuracy"] = run_mean(history, "rewards/accuracies")
        out["reward_margin"] = run_mean(history, "rewards/margins")
        out["reward_accuracy_last"] = _clean(last_train.get("rewards/accuracies"))
        out["reward_margin_last"] = _clean(last_train.get("rewards/margins"))
        out["pairs_per_second"] = tm.get("train_samples_per_second")
        if eval_metrics:
            out["eval_reward_accuracy"] = _clean(eval_metrics.get("eval_rewards/accuracies"))
            out["eval_reward_margin"] = _clean(eval_metrics.get("eval_rewards/margins"))
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

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
from pathlib import Path, PurePosixPath

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from job import progress, storage
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


class OneWriterTensorBoard(TensorBoardCallback):
    """transformers' TensorBoard callback, whose writer stays open when training ends: the final evaluate() after
    training logs to it too, and `evaluate._copy_tensorboard` closes it before the files are copied.

    transformers closes the writer at the end of training, and the final evaluate() opened a second one in the same
    directory. tensorboardX names an event file by the second it is opened in (`events.out.tfevents.<seconds>.<host>`)
    and opens it with "wb", so a second writer opened within the same second as the first truncated the first's file:
    training's scalars were lost (a short run in CI: tests/test_evaluate.py)."""

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer is not None:
            self.tb_writer.flush()


def keep_one_tensorboard_writer(trainer) -> None:
    """Replace transformers' TensorBoard callback, if the trainer has one (JOB_TRAIN__REPORT_TO=tensorboard), by
    `OneWriterTensorBoard`, in the same place among the callbacks."""
    callbacks = trainer.callback_handler.callbacks
    for i, cb in enumerate(callbacks):
        if type(cb) is TensorBoardCallback:  # not yet used: its state is what the constructor sets
            callbacks[i] = OneWriterTensorBoard(tb_writer=cb.tb_writer)


class MetricsCallback(TrainerCallback):
    """Makes the trainer's log history complete, and emits each logging step as one JSON log line (no progress bar).

    transformers logs every LOGGING_STEPS steps and not at the last step, so the steps after the last multiple of
    LOGGING_STEPS are in no row; and a checkpoint saved between two log rows resumes without the rows of the steps
    before it. A log row at the last step and at every save closes both gaps: the history in the final checkpoint
    (trainer_state.json, restored on resume) then covers every step of the run exactly once, across sessions."""

    def __init__(self, emit: bool):
        self.emit = emit
        self.eta = progress.Eta()

    def on_train_begin(self, args, state, control, **kwargs):
        self.eta.start(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.emit and state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **{k: _clean(v) for k, v in logs.items()}}
            # step, total_steps and eta_s: progress for whoever reads the logs (job/progress.py).
            fields = {"event": "metrics", **row, **self.eta.fields(state.global_step, state.max_steps)}
            log.info("step %d of %d", state.global_step, state.max_steps, extra={"fields": fields})


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


def memory_plan_report(report: dict | None, peak_gib: float | None) -> dict | None:
    """metrics.json `memory_plan`: the plan's report with the estimated peak (what was allocated before training plus
    the estimate) next to the measured one."""
    if report is None:
        return None
    out = dict(report)
    if report.get("auto") and report.get("allocated_before_gib") is not None:
        out["estimated_peak_gib"] = round(report["allocated_before_gib"] + report["chosen"]["estimated_gib"], 2)
        out["measured_peak_gib"] = peak_gib
    return out


def micro_batch_shape(rows: int, world_size: int, batch: int, accumulation: int) -> dict:
    """What a step of each process held: micro-batches of `rows` examples, `per_step` of them. Data smaller than the
    configured batch (PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS) fills fewer: one packed row is one
    row per step, whatever the batch size (the plan's figures, job/preflight.py's planned_steps)."""
    here = -(-rows // world_size)
    return {"rows": max(1, min(batch, here)), "per_step": max(1, min(accumulation, -(-here // batch)))}


def final_metrics(stage: str, trainer, train_result, eval_metrics: dict | None, *, lengths: dict) -> dict:
    """metrics.json. Run figures come from the trainer's log history, which covers every step of the run across
    resumes; throughput is this session's (the steps this process trained), labelled so."""
    import torch

    from job import evaluate

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
        # How this run spent memory for speed: activations kept (checkpointing off), a dequantized copy of the base.
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        "offloaded_checkpoints": bool(getattr(trainer, "job_offload", False)),  # JOB_TRAIN__OFFLOAD_CHECKPOINTS in effect
        "dequantized_copy_gib": getattr(trainer, "job_dequantized_gib", None),
        # DPO: each micro-batch's rows joined into one row without padding (JOB_TRAIN__PACKING; job/padfree.py).
        **({"padding_free": bool(getattr(trainer, "job_padding_free", False))} if stage == "dpo" else {}),
        # How each step was split (JOB_TRAIN__MERGE_MICRO_BATCHES): examples per micro-batch (SFT: packed rows when
        # packing; DPO: pairs) and micro-batches per step.
        "micro_batch": micro_batch_shape(len(trainer.train_dataset), trainer.args.world_size,
                                         trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps),
        # What the length policy did (job/sequences.py): examples kept, prompts cut, dropped, and the first rows of each.
        "length_policy": lengths,
        # Which fast paths ran and why any was off (job/fastpaths.py).
        "fast_paths": trainer.job_fast_paths.report() if getattr(trainer, "job_fast_paths", None) else None,
    }
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    # What the memory plan chose and why (job/memplan.py), its estimate beside the measured peak.
    out["memory_plan"] = memory_plan_report(getattr(trainer, "job_memory_plan", None), out["peak_gpu_memory_gib"])
    if stage == "sft":
        out["mean_token_accuracy"] = run_mean(history, "mean_token_accuracy")
        out["mean_token_accuracy_last"] = _clean(last.get("mean_token_accuracy"))
    out.update(evaluate.eval_metrics(stage, eval_metrics) if eval_metrics else {"eval_loss": None})
    if stage == "dpo":
        for key, name in (("rewards/accuracies", "reward_accuracy"), ("rewards/margins", "reward_margin"),
                          ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
            out[name] = run_mean(history, key)
            out[f"{name}_last"] = _clean(last.get(key))
        # Pairs this session: each pair is a chosen and a rejected row; every process trains as many.
        pairs = getattr(trainer, "job_rows_seen", 0) // 2 * trainer.args.world_size
        out["session"]["pairs"] = pairs
        out["pairs_per_second"] = round(pairs / runtime, 4) if runtime and pairs else None
    return out


MODEL_CARD = """---
{metadata}---
# {run_id} ({stage})

LoRA adapter trained by qlora-job ({stage}) on `{base}` {quant_text}, with data `{data}`.{start_text} {where_text}

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter = "{adapter}"
tok = AutoTokenizer.from_pretrained(adapter{hub_args})  # carries the prompt format as its chat template
base = AutoModelForCausalLM.from_pretrained("{base_ref}"{base_args}, dtype="auto", device_map="auto"){base_note}
model = PeftModel.from_pretrained(base, adapter{hub_args})
inputs = tok.apply_chat_template([{{"role": "user", "content": "質問"}}], add_generation_prompt=True,
                                 return_dict=True, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=64)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

{base_16bit_text}Prompt format: `{prompt_format}` (see prompt_format.json). Metrics: see metrics.json beside this folder.
{results_text}"""

#: metrics.json keys shown as a card's eval results: (key, metric type, name).
CARD_RESULTS = (("eval_loss", "loss", "held-out loss"),
                ("eval_mean_token_accuracy", "accuracy", "held-out mean token accuracy"),
                ("eval_reward_accuracy", "accuracy", "held-out reward accuracy"),
                ("eval_reward_margin", "reward_margin", "held-out reward margin"),
                ("generation_exact_match_after", "exact_match", "greedy answers equal to the reference"))


def hub_dataset(uri: str | None) -> str | None:
    """The Hub id of a dataset URI (`hf://datasets/org/name`), else None."""
    parsed = storage.parse_uri(uri) if uri else None
    return parsed.repo_id if isinstance(parsed, storage.HfUri) and parsed.repo_type == "dataset" else None


def card_metadata(*, base_model: str | None, relation: str, tags: list[str], model_name: str,
                  results: list[tuple[str, str, float]] = (), results_data: str | None = None,
                  datasets: list[str] = (), library_name: str | None = None) -> str:
    """A model card's YAML front matter in the Hub's conventions, written by huggingface_hub: `base_model` (a Hub model
    id only: the Hub links the card to it) with `base_model_relation`, `library_name`, `datasets` (Hub ids), `tags`,
    and `results` (metric type, name, value) as eval results (`model-index`) on `results_data`."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_id = hub_dataset(results_data)
    evals = [EvalResult(task_type="text-generation", dataset_type=hub_id or "custom",
                        dataset_name=hub_id or results_data or "held-out data", metric_type=kind, metric_value=value,
                        metric_name=name) for kind, name, value in results]
    card = ModelCardData(base_model=base_model, library_name=library_name, datasets=list(dict.fromkeys(datasets)) or None,
                         tags=tags, model_name=model_name, eval_results=evals or None,
                         **({"base_model_relation": relation} if base_model else {}))
    return card.to_yaml() + "\n"


def quant_text(quant: dict | None) -> str:
    """How training stored the base, for a card: `in 4-bit NF4 (QLoRA: ...)`."""
    q = quant or {}
    if q.get("load_in", "4bit") == "none":
        return f"in {q.get('compute_dtype', 'bfloat16')} (not quantized)"
    if q.get("load_in") == "8bit":
        return "quantized to 8 bits (bitsandbytes LLM.int8)"
    return (f"quantized to 4-bit {q.get('type', 'nf4').upper()} (QLoRA: bitsandbytes, "
            f"{'double quantization, ' if q.get('double_quant', True) else ''}{q.get('compute_dtype', 'bfloat16')} compute)")


def base_model_ref(base: str) -> tuple[str, str | None, str | None]:
    """JOB_BASE_MODEL as others can name it: (reference, Hub repo id or None, Hub revision or None). A Hub model is
    its repo id; an S3 URI or a local directory stays as given (never the pod's download folder)."""
    uri = storage.as_model_uri(base)
    if isinstance(uri, storage.HfUri):
        return uri.repo_id, uri.repo_id, uri.revision
    return base, None, None


def location_ref(output: str | None, run_id: str, folder: str) -> tuple[str, str, str]:
    """How a user loads `{output}/{run_id}/{folder}`: (path or repo id, extra from_pretrained arguments, a sentence
    for the model card)."""
    uri = storage.parse_uri(output) if output else None
    if isinstance(uri, storage.HfUri):
        where = uri.join(run_id, folder)
        args = f', subfolder="{where.path}"' + (f', revision="{uri.revision}"' if uri.revision else "")
        root = f'`subfolder="{uri.path}"`' if uri.path else "no subfolder"
        return uri.repo_id, args, (f"On the Hub, `{uri.repo_id}` with `subfolder=\"{where.path}\"` is this run's {folder}; "
                                   f"with {root} it is the latest run's, and `revision=\"{run_id}\"` pins it to this run's.")
    if isinstance(uri, storage.LocalUri):
        return str(uri.join(run_id, folder).path.resolve()), "", ""
    if uri is None:
        return folder, "", f"Run this beside the `{folder}` folder."
    return folder, "", f"Download it first (`aws s3 sync {uri.join(run_id, folder)}/ {folder}`), then run this beside it."


def write_prompt_format(dest: Path, tokenizer, prompt_format: str) -> None:
    example = tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}, {"role": "assistant", "content": "{answer}"}], tokenize=False
    )
    (dest / "prompt_format.json").write_text(
        json.dumps({"name": prompt_format, "chat_template": tokenizer.chat_template, "rendered_example": example}, ensure_ascii=False, indent=2),
        encoding="utf-8",
    )


def write_adapter(dest: Path, model, tokenizer, prompt_format: str, *, base: str, data: str, run_id: str, stage: str,
                  output: str | None = None) -> None:
    """The trained adapter with its tokenizer, prompt format and model card. `output` (JOB_OUTPUT) lets the card's
    snippet name where the adapter will be. `publish` completes the card from run.json and metrics.json."""
    # Only the trained adapter: DPO's frozen "ref" copy is an implementation detail of training.
    model.save_pretrained(dest, selected_adapters=["default"], safe_serialization=True)
    base_ref, _, revision = base_model_ref(base)
    # PEFT records the folder the base was loaded from, here a download folder of the pod that no longer exists.
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_ref
    if revision:
        config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(dest)
    write_prompt_format(dest, tokenizer, prompt_format)
    write_model_card(dest, base=base, data=data, run_id=run_id, stage=stage, output=output, prompt_format=prompt_format)


def write_model_card(dest: Path, *, base: str, data: str, run_id: str, stage: str, output: str | None,
                     prompt_format: str, quant: dict | None = None, adapter: str | None = None,
                     eval_data: str | None = None, metrics: dict | None = None) -> None:
    """The adapter's README.md: Hub metadata (card_metadata), how it was trained, a snippet that loads it."""
    base_ref, repo_id, revision = base_model_ref(base)
    where, hub_args, where_text = location_ref(output, run_id, "adapter")
    m = metrics or {}
    results = [(kind, name, m[key]) for key, kind, name in CARD_RESULTS if m.get(key) is not None]
    start = f" It started from the adapter `{adapter}`" + (", also DPO's frozen reference." if stage == "dpo" else ".") \
        if adapter else ""
    four_bit = (quant or {}).get("load_in", "4bit") != "none"
    base_16bit = ("The snippet loads the base in 16 bits: its answers differ slightly from the trained model's (the base's "
                  "quantization error). `BitsAndBytesConfig` with the settings above reproduces the trained model; "
                  "JOB_STAGE=merge (JOB_MERGE__BASE=dequantized) makes a 16-bit model that computes as it does.\n\n"
                  if four_bit else "")
    lines = [f"| {name} | {value:.4g} |" for _, name, value in results]
    results_text = ("\n| held-out metric | value |\n|---|---|\n" + "\n".join(lines) + "\n") if lines else ""
    (dest / "README.md").write_text(MODEL_CARD.format(
        metadata=card_metadata(base_model=repo_id, relation="adapter", library_name="peft", model_name=run_id,
                               tags=["qlora-job", stage, "lora", "qlora" if four_bit else "peft"],
                               datasets=[d for d in (hub_dataset(data), hub_dataset(eval_data)) if d],
                               results=results, results_data=eval_data or data),
        base=base, data=data, run_id=run_id, stage=stage, prompt_format=prompt_format, quant_text=quant_text(quant),
        start_text=start, adapter=where, hub_args=hub_args, where_text=where_text, base_ref=base_ref,
        base_args=f', revision="{revision}"' if revision else "",
        base_note="  # download it first (aws s3 sync) and give its folder" if base_ref.startswith("s3://") else "",
        base_16bit_text=base_16bit, results_text=results_text,
    ), encoding="utf-8")


def complete_model_card(local: Path) -> None:
    """Rewrite adapter/README.md with what only the finished run knows (run.json's config, metrics.json's held-out
    figures): the adapter is written before the final evaluation."""
    card, run_path, metrics_path = local / "adapter" / "README.md", local / "run.json", local / "metrics.json"
    if not (card.exists() and run_path.exists()):
        return
    run = json.loads(run_path.read_text(encoding="utf-8"))
    c = run.get("config") or {}
    if run.get("stage") not in ("sft", "dpo") or "base_model" not in c:
        return
    write_model_card(card.parent, base=c["base_model"], data=c["data"], run_id=run["run_id"], stage=run["stage"],
                     output=c.get("output"), prompt_format=run.get("prompt_format", ""), quant=c.get("quant"),
                     adapter=c.get("adapter"), eval_data=c.get("eval_data"),
                     metrics=json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else None)


def write_json(path: Path, data: dict) -> None:
    path.write_text(redact(json.dumps(data, ensure_ascii=False, indent=2, default=str)) + "\n", encoding="utf-8")


def publish(local: Path, remote: storage.Uri, token: str | None) -> None:
    """Upload everything, then `_SUCCESS` alone: its presence means every other file is complete.

    On the Hub a commit is all-or-nothing, so there it is one commit named after the run, `_SUCCESS` included, and the
    run's artifact (merged/ or adapter/) also becomes the root of the output (storage.publish_hub)."""
    complete_model_card(local)
    marker = local.parent / "_SUCCESS"
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    if isinstance(remote, storage.HfUri):
        run = json.loads((local / "run.json").read_text(encoding="utf-8")) if (local / "run.json").exists() else {}
        latest = next((d for d in ("merged", "adapter") if (local / d).is_dir()), None)
        message = f"qlora-job {run.get('stage', 'run')} {PurePosixPath(remote.path).name}"
        storage.publish_hub(local, marker, remote, token, message=message, latest=latest)
        return
    storage.push(local, remote, token)
    storage.push(marker, remote.join("_SUCCESS"), token)


def clean_workdir(s, workdir: Path) -> None:
    """After the run's outputs are uploaded: its scratch folder under JOB_WORKDIR (downloaded data and weights, local
    checkpoints, the outputs; a merged model, 26 GB at 13B) is removed, unless JOB_KEEP_WORKDIR=true. Local inputs
    are used in place: a folder that holds one is kept."""
    import shutil

    from job.errors import path_inside

    if s.keep_workdir:
        log.info("JOB_KEEP_WORKDIR=true: the run's scratch folder %s is kept", workdir)
        return
    inputs = [p for p in (s.data, s.eval_data, s.base_model, s.adapter, s.eval_prompts)
              if p and isinstance(storage.parse_uri(p), storage.LocalUri)]
    if any(path_inside(p, str(workdir)) for p in inputs):
        log.warning("the run's scratch folder %s holds an input of this run: kept", workdir)
        return
    shutil.rmtree(workdir, ignore_errors=True)
    log.info("removed the run's scratch folder %s (everything in it is uploaded; JOB_KEEP_WORKDIR=true keeps it)", workdir)

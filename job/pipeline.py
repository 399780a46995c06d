"""One run, top to bottom: settings -> preflight (every check, no weights) -> weights -> train (TRL) -> outputs ->
push -> _SUCCESS.

    >>> from job.settings import load_settings
    >>> from job.pipeline import run
    >>> run(load_settings())          # reads JOB_* from the environment; returns the run's output URI
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from job import phases, preflight, runlock, storage
from job.distributed import first_process_per_node as _first_process_per_node
from job.distributed import same_on_every_process as _same_on_every_process
from job.distributed import state as _distributed_state
from job.errors import OutOfMemory, Preempted, TransientError
from job.settings import JobSettings
from job.signals import StopSignal

log = logging.getLogger("job")


def check(s: JobSettings) -> dict:
    """--check: every check a run makes before downloading weights; returns what the run would do."""
    if s.stage == "merge":  # no data, no training: its own module
        from job.stages import merge

        preflight.libraries(s)
        return merge.check(s)
    return preflight.prepare(s, s.resolved_run_id(), dry=True).report


def run(s: JobSettings, *, stop: StopSignal | None = None, progress_bar: bool = False) -> str:
    """Run one stage; returns the URI of the run's outputs. Raises JobError subclasses for expected failures."""
    if s.stage == "merge":  # no data, no training: its own module
        from job.stages import merge

        preflight.libraries(s)
        return merge.run(s)
    stop = stop or StopSignal()
    phases.begin()
    state = _distributed_state()
    run_id = _same_on_every_process(s.resolved_run_id())
    # 0. One run per run id: a second start while this one is alive exits 2 (job/runlock.py). Taken before the
    #    preflight, whose JOB_RESTART=true would otherwise empty a running run's folder.
    with runlock.hold(s, run_id, main=state.is_main_process) as lock:
        return _run(s, run_id, state, lock, stop, progress_bar)


def _run(s: JobSettings, run_id: str, state, lock, stop: StopSignal, progress_bar: bool) -> str:
    """The run, holding its lock. The training libraries are imported by the preflight, once the settings, storage
    and data are checked (job/preflight.py `libraries`)."""
    phases.mark("imports")

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    tok = preflight.token(s)

    # 1. Everything that can fail before the weights: writability, data, model identity and modules, run identity,
    #    EOS and length policy. Data and small files come once per node (the node's first process fetches them).
    with _first_process_per_node():
        plan = preflight.prepare(s, run_id, main=state.is_main_process, world_size=state.num_processes)
    phases.mark("preflight")
    import torch

    from job import divergence, evaluate, outputs

    remote = plan.remote
    if plan.state == "succeeded":
        log.info("run %s already succeeded at %s; nothing to do", run_id, remote)
        return str(remote)
    out = plan.workdir / "out"
    with _first_process_per_node():
        if out.exists():
            shutil.rmtree(out)  # leftovers of an earlier attempt in this pod are never published
        out.mkdir(parents=True, exist_ok=True)
    log.info("run %s: %s of %s -> %s", run_id, s.stage, s.base_model, remote,
             extra={"fields": {"event": "start", "run_id": run_id, "stage": s.stage, "output": str(remote)}})

    # 2. What this run is, recorded before the expensive part: a later start with this run id must match it.
    if state.is_main_process and plan.state == "new":
        preflight.record_identity(plan, tok)

    # 3. The weights (safetensors only), at the revision identified in 1.
    with _first_process_per_node():
        base_dir = preflight.pull_weights(s, plan.models)
    phases.mark("weights")

    # 4. Train: TRL owns the loop; a retried pod continues from the last uploaded checkpoint of this run.
    trainer, result, resume_from, before = _train(s, plan, base_dir, stop, progress_bar)
    eval_metrics = trainer.evaluate() if plan.eval is not None else None

    # 5. Outputs: written locally, uploaded, then _SUCCESS last. Only one process uploads.
    if not trainer.is_world_process_zero():
        if state.is_local_main_process:  # another node's scratch folder: rank 0 uploads what counts
            outputs.clean_workdir(s, plan.workdir)
        return str(remote)
    divergence.check_weights(trainer.model, trainer.state.global_step, s.train.learning_rate)  # never publish NaN weights
    after = evaluate.generate_after(trainer, plan.tokenizer, plan.prompts, s)  # the trained adapter's answers
    phases.mark("after")
    outputs.write_adapter(out / "adapter", trainer.model, plan.tokenizer, plan.prompt_format,
                          base=s.base_model, data=s.data, run_id=run_id, stage=s.stage, output=s.output)
    outputs.write_history(out / "metrics.jsonl", trainer.state.log_history)
    metrics = outputs.final_metrics(s.stage, trainer, result, eval_metrics, lengths={"train": plan.train.report,
                                    "eval": plan.eval.report if plan.eval else None})
    metrics.update(evaluate.write_report(out, s, trainer, plan.prompts, before, after))  # generations.*, loss.png
    metrics["warnings"] = divergence.training_warnings(trainer.state.log_history, s.train.learning_rate)
    for warning in metrics["warnings"]:
        log.warning("%s", warning, extra={"fields": {"event": "training_warning"}})
    outputs.write_json(out / "metrics.json", metrics)
    phases.mark("write")
    outputs.write_json(out / "run.json", {
        "run_id": run_id,
        "status": "succeeded",
        "stage": s.stage,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_time_s": round(time.monotonic() - t0, 3),
        "resumed_from": resume_from.name if resume_from else None,
        "prompt_format": plan.prompt_format,
        "identity_sha256": plan.identity["sha256"],
        "config": s.masked(),
        "inputs": {**plan.inputs.identity, **plan.model_identity},
        "data_files": plan.inputs.files,
        "versions": outputs.versions(),
        "device": str(next(trainer.model.parameters()).device),
        "world_size": trainer.args.world_size,
        "phases_s": phases.seconds(),  # where the wall time went (job/phases.py); the upload is in the last log line
    })
    lock.check()  # still this run's: one whose heartbeat failed for JOB_LOCK_TTL may have been taken over
    outputs.publish(out, remote, tok)
    storage.delete(remote.join("checkpoints"), tok)  # the run is complete; its checkpoints are no longer needed
    phases.mark("publish")
    log.info("done: %s", remote, extra={"fields": {"event": "done", "output": str(remote), "metrics": metrics,
                                                   "phases_s": phases.seconds()}})
    print(evaluate.summary(out, str(remote), trainer.state.log_history), flush=True)
    outputs.clean_workdir(s, plan.workdir)  # all of it is uploaded (JOB_KEEP_WORKDIR=true keeps it)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(remote)


def _train(s: JobSettings, plan: preflight.Plan, base_dir: Path, stop: StopSignal, progress_bar: bool):
    """Load the model, build the stage's trainer and train. A run that runs out of GPU memory on a choice `auto` made
    (job/memplan.py's estimate can be wrong: allocator fragmentation, another process on the GPU) starts again from its
    last checkpoint without that choice, the one that frees most first: the micro-batch as set
    (JOB_TRAIN__MERGE_MICRO_BATCHES), then without the dequantized copy of the base (JOB_QUANT__KEEP_DEQUANTIZED), then
    with gradient checkpointing on (JOB_TRAIN__GRADIENT_CHECKPOINTING), then with the checkpointed layers' inputs in CPU
    memory (JOB_TRAIN__OFFLOAD_CHECKPOINTS); the plan is made again around each choice given back. With several
    processes the one that ran out can't start again alone (the others wait in the step's collectives): it records the
    choice in the run's storage and exits 75, and the retried pod group starts with it."""
    import torch

    forced: dict = {"checkpointing": None, "keep_dequantized": None, "micro_batch_rows": None, "offload": None,
                    **_recorded_choices(s, plan)}
    rows = s.train.per_device_train_batch_size
    while True:
        used: dict = {}
        try:
            return _train_once(s, plan, base_dir, stop, progress_bar, forced=forced, used=used)
        except torch.OutOfMemoryError:
            if used.get("micro_batch", rows) > rows and s.train.merge_micro_batches == "auto":
                forced["micro_batch_rows"] = rows
                what = (f"with micro-batches of {used['micro_batch']} rows (JOB_TRAIN__MERGE_MICRO_BATCHES=auto guessed "
                        f"they would fit): starting again with {rows} rows, as set")
            elif used.get("dequantized") and s.quant.keep_dequantized == "auto":
                forced["keep_dequantized"] = False
                what = "with the 4-bit base dequantized once (JOB_QUANT__KEEP_DEQUANTIZED=auto guessed it would fit): " \
                       "starting again without the copy"
            elif used.get("checkpointing") is False and s.train.gradient_checkpointing == "auto":
                forced["checkpointing"] = True
                what = "with gradient checkpointing off (JOB_TRAIN__GRADIENT_CHECKPOINTING=auto guessed it would fit): " \
                       "starting again with it on"
            elif used.get("checkpointing") and not used.get("offload") and s.train.offload_checkpoints == "auto" \
                    and torch.cuda.is_available():
                forced["offload"] = True
                what = "with checkpointed layer inputs on the GPU (JOB_TRAIN__OFFLOAD_CHECKPOINTS=auto guessed they would " \
                       "fit): starting again with them in CPU memory"
            else:  # nothing left to try
                raise OutOfMemory(_oom_message(s, used)) from None
            if _distributed_state().num_processes > 1:
                _record_choices(s, plan, forced)
                raise TransientError(f"out of GPU memory {what.split(': starting again')[0]}: with several processes "
                                     "this one can't start again alone; the retried pod group starts "
                                     + what.split("starting again ")[-1]) from None
            log.warning("out of GPU memory %s", what, extra={"fields": {"event": "oom_retry"}})
        # Outside the except block, so that the failed attempt's frames (and its model) can be freed.
        used.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


#: Under the run's checkpoints (deleted with them on success and by JOB_RESTART): the memory choices an earlier
#: attempt with several processes gave up after running out of GPU memory.
MEMORY_CHOICES = "memory_choices.json"


def _record_choices(s: JobSettings, plan: preflight.Plan, forced: dict) -> None:
    path = plan.workdir / MEMORY_CHOICES
    path.write_text(json.dumps(forced) + "\n")
    storage.push(path, plan.remote.join("checkpoints", MEMORY_CHOICES), preflight.token(s))


def _recorded_choices(s: JobSettings, plan: preflight.Plan) -> dict:
    uri = plan.remote.join("checkpoints", MEMORY_CHOICES)
    if not storage.exists(uri, preflight.token(s)):
        return {}
    path, _ = storage.pull(uri, plan.workdir / "recorded", token=preflight.token(s))
    choices = json.loads(Path(path).read_text())
    log.info("memory choices of an earlier attempt that ran out of GPU memory: %s", choices)
    return {k: v for k, v in choices.items() if v is not None}


def _oom_message(s: JobSettings, used: dict) -> str:
    import torch

    t = s.train
    return (f"out of GPU memory with gradient checkpointing {'on' if used.get('checkpointing') else 'off'}: lower "
            f"JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE (now {t.per_device_train_batch_size}; raise "
            f"JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS to keep the step size) or JOB_TRAIN__MAX_LENGTH (now {t.max_length})"
            + ("" if used.get("checkpointing") else ", or set JOB_TRAIN__GRADIENT_CHECKPOINTING=true")
            + (", or set JOB_TRAIN__OFFLOAD_CHECKPOINTS=true" if used.get("checkpointing") and not used.get("offload")
               and torch.cuda.is_available() else "")
            + (", or set JOB_QUANT__KEEP_DEQUANTIZED=false" if used.get("dequantized") else "")
            + (f", or set JOB_TRAIN__MERGE_MICRO_BATCHES=false (micro-batches of {used['micro_batch']} rows were used)"
               if used.get("micro_batch", t.per_device_train_batch_size) > t.per_device_train_batch_size else ""))


def _train_once(s, plan, base_dir, stop, progress_bar, *, forced, used):
    from job import evaluate, outputs
    from job.checkpoints import CheckpointCallback, pull_latest
    from job.divergence import DivergenceCallback
    from job.model import load_adapter, load_base_model
    from job.stages import dpo, sft

    tok = preflight.token(s)
    checkpoints = plan.remote.join("checkpoints")
    with _first_process_per_node():
        resume_from = pull_latest(checkpoints, plan.workdir / "resume", tok, identity=plan.identity["sha256"])
    t0 = time.monotonic()
    model = load_base_model(base_dir, s)  # 4-bit NF4 by default, on this process's GPU
    log.info("base model loaded in %.1fs (%s)", time.monotonic() - t0, s.quant.load_in)
    if plan.adapter_dir:
        model = load_adapter(model, plan.adapter_dir)
    phases.mark("load")
    stage = sft if s.stage == "sft" else dpo
    metrics_cb = outputs.MetricsCallback(emit=not progress_bar)
    # The checkpoint callback first: the metrics callback then sees its save decisions (a log row at every save).
    # The divergence check last: it checks the weights at the steps the others decided to log or save at.
    callbacks = [CheckpointCallback(checkpoints, stop, tok), metrics_cb, DivergenceCallback(s.train.learning_rate),
                 phases.first_step_callback()]
    trainer = stage.build_trainer(s, model, plan.tokenizer, plan.train.rows, plan.eval.rows if plan.eval else None,
                                  plan.workdir / "checkpoints", callbacks, progress_bar=progress_bar,
                                  checkpointing=forced["checkpointing"], keep_dequantized=forced["keep_dequantized"],
                                  micro_batch_rows=forced["micro_batch_rows"], offload=forced["offload"],
                                  identity=plan.identity["sha256"])
    used["checkpointing"] = bool(trainer.args.activation_checkpointing)
    used["dequantized"] = trainer.job_dequantized_gib is not None
    used["micro_batch"] = trainer.args.per_device_train_batch_size
    used["offload"] = trainer.job_offload
    if not progress_bar:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our MetricsCallback prints the same as one JSON line
    outputs.keep_one_tensorboard_writer(trainer)
    phases.mark("trainer")
    # The starting model's answers (base, or base + JOB_ADAPTER): before train(), which loads any resume checkpoint.
    before = evaluate.generate_before(trainer, plan.tokenizer, plan.prompts, s)
    phases.mark("before")
    stop.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.training = False
    phases.mark("train")
    stop.finished = True
    if stop.received:
        raise Preempted(f"{stop.received} received: checkpoint at step {trainer.state.global_step} uploaded to {checkpoints}",
                        signal_name=stop.received)
    return trainer, result, resume_from, before

"""One run, top to bottom: settings -> pull -> data -> model -> train (TRL) -> outputs -> push -> _SUCCESS.

    >>> from job.settings import load_settings
    >>> from job.pipeline import run
    >>> run(load_settings())          # reads JOB_* from the environment; returns the run's output URI
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from job import data, storage
from job.checkpoints import CheckpointCallback, StopSignal, pull_latest
from job.errors import DataError, ModelError, Preempted
from job.settings import JobSettings

log = logging.getLogger("job")


@dataclass
class Inputs:
    """What the run read, and how to recognise it again (run.json's `inputs`)."""

    train: list[dict]
    eval: list[dict]
    identity: dict = field(default_factory=dict)


def _token(s: JobSettings) -> str | None:
    return s.hf_token.get_secret_value() if s.hf_token else None


def read_data(s: JobSettings, workdir: Path) -> Inputs:
    """Pull and validate the training (and eval) data. Raises DataError naming file and row."""
    identity = {}
    sets = {}
    for role, uri_text in (("train", s.data), ("eval", s.eval_data)):
        if not uri_text:
            continue
        path, ident = storage.pull(storage.parse_uri(uri_text), workdir / "data" / role, token=_token(s))
        files = data.data_files(path, uri_text)
        ident["sha256"] = {name: storage.sha256(p) for p, name in files}
        identity[role] = ident
        sets[role] = data.load_records(path, uri_text, s.stage, s.columns)
    train, held_out = data.split_eval(sets["train"], s.eval_fraction, s.train.seed)
    return Inputs(train=train, eval=sets.get("eval", held_out), identity=identity)


def pull_model(s: JobSettings, workdir: Path, *, tokenizer_only: bool = False) -> tuple[Path, Path | None, dict]:
    """Base model (safetensors only) and the optional adapter to continue from."""
    from job.model import ADAPTER_FILES, MODEL_FILES, TOKENIZER_FILES

    def pull(variable: str, uri_text: str, dest: Path, include: list[str]):
        try:
            return storage.pull(storage.as_model_uri(uri_text), dest, include=include, token=_token(s))
        except DataError as exc:  # storage can't tell a model from data: missing here means a model problem (exit 4)
            raise ModelError(f"{variable}: {exc}") from None

    include = TOKENIZER_FILES if tokenizer_only else MODEL_FILES
    base_dir, base_id = pull("JOB_BASE_MODEL", s.base_model, workdir / "model", include)
    adapter_dir, adapter_id = None, None
    if s.adapter:
        adapter_dir, adapter_id = pull("JOB_ADAPTER", s.adapter, workdir / "adapter", ADAPTER_FILES)
    return base_dir, adapter_dir, {"base_model": base_id, "adapter": adapter_id}


def check(s: JobSettings) -> dict:
    """--check: validate config and data, report dataset stats; downloads the data and the tokenizer only."""
    from job.model import load_tokenizer

    workdir = Path(s.workdir) / "check"
    inputs = read_data(s, workdir)
    base_dir, adapter_dir, _ = pull_model(s, workdir, tokenizer_only=True)
    tokenizer, fmt = load_tokenizer(base_dir, adapter_dir, s.prompt_format)
    report = {
        "stage": s.stage,
        "prompt_format": fmt,
        "train": data.token_stats(inputs.train, tokenizer, s.train.max_length),
        "eval": data.token_stats(inputs.eval, tokenizer, s.train.max_length) if inputs.eval else None,
        "inputs": inputs.identity,
    }
    if report["train"]["over_max_length"]:
        log.warning("%d training records are longer than JOB_TRAIN__MAX_LENGTH=%d and will be truncated",
                    report["train"]["over_max_length"], s.train.max_length)
    return report


def run(s: JobSettings, *, stop: StopSignal | None = None, progress_bar: bool = False) -> str:
    """Run one stage; returns the URI of the run's outputs. Raises JobError subclasses for expected failures."""
    import torch

    from job import evaluate, outputs
    from job.model import load_adapter, load_base_model, load_tokenizer
    from job.stages import dpo, sft

    stop = stop or StopSignal()
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    run_id = _same_on_every_process(s.resolved_run_id())
    token = _token(s)
    remote = storage.parse_uri(s.output).join(run_id)

    # 1. Idempotence: a run id that already succeeded is not trained again (a retried Job finishing late, a CI re-run).
    if storage.exists(remote.join("_SUCCESS"), token):
        log.info("run %s already succeeded at %s; nothing to do", run_id, remote)
        return str(remote)

    workdir = Path(s.workdir) / run_id
    out = workdir / "out"
    with _first_process_per_node():
        if out.exists():
            shutil.rmtree(out)  # leftovers of an earlier attempt in this pod are never published
        out.mkdir(parents=True, exist_ok=True)
    log.info("run %s: %s of %s -> %s", run_id, s.stage, s.base_model, remote,
             extra={"fields": {"event": "start", "run_id": run_id, "stage": s.stage, "output": str(remote)}})

    # 2-4 run on the node's first process first; the others then find the files in place (one download per node).
    with _first_process_per_node():
        # 2. Data first: bad data must fail before gigabytes of weights are downloaded or a GPU is warmed up.
        inputs = read_data(s, workdir)
        log.info("data: %d training and %d eval records", len(inputs.train), len(inputs.eval))
        prompts = evaluate.load_prompts(s, inputs, workdir, token)  # before/after generations (evaluate.py)

        # 3. Model: the base, then the adapter to continue (DPO after SFT), with the tokenizer that matches it.
        base_dir, adapter_dir, model_identity = pull_model(s, workdir)

        # 4. Resume: a pod retried with the same run id continues from the last uploaded checkpoint.
        checkpoints = remote.join("checkpoints")
        resume_from = pull_latest(checkpoints, workdir / "resume", token)
    tokenizer, prompt_format = load_tokenizer(base_dir, adapter_dir, s.prompt_format)
    model = load_base_model(base_dir, s)  # 4-bit NF4 by default, on this process's GPU
    if adapter_dir:
        model = load_adapter(model, adapter_dir)

    # 5. Train: TRL owns the loop; our callbacks record metrics and upload checkpoints.
    metrics_cb = outputs.MetricsCallback(out / "metrics.jsonl", emit=not progress_bar)
    callbacks = [metrics_cb, CheckpointCallback(checkpoints, stop, token)]
    stage = sft if s.stage == "sft" else dpo
    train_ds = data.to_dataset(inputs.train)
    eval_ds = data.to_dataset(inputs.eval) if inputs.eval else None
    trainer = stage.build_trainer(s, model, tokenizer, train_ds, eval_ds, workdir / "checkpoints", callbacks, progress_bar=progress_bar)
    if not progress_bar:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our MetricsCallback prints the same as one JSON line
    if len(trainer.train_dataset) == 0:
        raise DataError(f"{s.data}: no training examples left after tokenization (all longer than JOB_TRAIN__MAX_LENGTH?)")
    before = evaluate.generate_before(trainer, tokenizer, prompts, s)  # the starting model: train() loads any resume checkpoint
    stop.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.training = False
    if stop.received:
        raise Preempted(f"{stop.received} received: checkpoint at step {trainer.state.global_step} uploaded to {checkpoints}")
    eval_metrics = trainer.evaluate() if eval_ds is not None else None

    # 6. Outputs: written locally, uploaded, then _SUCCESS last. Only one process uploads.
    if not trainer.is_world_process_zero():
        return str(remote)
    after = evaluate.generate_after(trainer, tokenizer, prompts, s)
    outputs.write_adapter(out / "adapter", trainer.model, tokenizer, prompt_format,
                          base=s.base_model, data=s.data, run_id=run_id, stage=s.stage)
    metrics = outputs.final_metrics(s.stage, trainer, result, metrics_cb.history, eval_metrics, time.monotonic() - t0)
    metrics.update(evaluate.eval_metrics(s.stage, eval_metrics))
    metrics.update(evaluate.write_report(out, s, trainer, prompts, before, after))  # generations.*, loss.png
    outputs.write_json(out / "metrics.json", metrics)
    outputs.write_json(out / "run.json", {
        "run_id": run_id,
        "status": "succeeded",
        "stage": s.stage,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_time_s": round(time.monotonic() - t0, 3),
        "resumed_from": resume_from.name if resume_from else None,
        "prompt_format": prompt_format,
        "config": s.masked(),
        "inputs": {**inputs.identity, **model_identity},
        "versions": outputs.versions(),
        "device": str(next(model.parameters()).device),
        "world_size": trainer.args.world_size,
    })
    outputs.publish(out, remote, token)
    storage.delete(checkpoints, token)  # the run is complete; its checkpoints are no longer needed
    log.info("done: %s", remote, extra={"fields": {"event": "done", "output": str(remote), "metrics": metrics}})
    print(evaluate.summary(out, str(remote), trainer.state.log_history), flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(remote)



def _first_process_per_node():
    """With several processes (torchrun), let the node's first one download while the others wait."""
    import contextlib

    state = _distributed_state()
    return state.local_main_process_first() if state.num_processes > 1 else contextlib.nullcontext()


def _same_on_every_process(run_id: str) -> str:
    """A generated run id must be the same on every rank: rank 0's wins."""
    from accelerate.utils import broadcast_object_list

    if _distributed_state().num_processes == 1:
        return run_id
    return broadcast_object_list([run_id], from_process=0)[0]


def _distributed_state():
    """accelerate's process state, as the Trainer will set it up (gloo on CPU, NCCL on GPUs; one process without torchrun)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())

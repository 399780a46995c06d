"""`JOB_TRAIN__*` and `JOB_DPO__*` -> TRL's `SFTConfig` / `DPOConfig`: the one place where settings become training
arguments. It runs twice: when the settings are loaded (with a neutral CPU runtime, so that every value passes TRL's
and transformers' own checks before anything is downloaded or a GPU warms up), and when the trainer is built.

Any field of the stage's config class can be set by its name (`JOB_TRAIN__NEFTUNE_NOISE_ALPHA=5`,
`JOB_DPO__RPO_ALPHA=1`); values are converted to the field's type. Fields the job itself manages (output paths,
save/eval strategies, the dataset preparation it does itself) are refused with the setting to use instead.

    >>> from job.settings import load_settings
    >>> s = load_settings({...})                              # raises ConfigError naming a bad JOB_TRAIN__OPTIM
    >>> args = build(s, Runtime(output_dir="/tmp/ckpt", cuda=True, has_eval=False, progress_bar=False,
    ...                          checkpointing=False, liger=True))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass

#: TRL/transformers fields the job sets itself: the value to use instead. (Setting them by name would break outputs,
#: resume or the length policy.)
MANAGED = {
    "output_dir": "JOB_OUTPUT / JOB_WORKDIR",
    "logging_dir": "JOB_WORKDIR",
    "overwrite_output_dir": "JOB_RUN_ID",
    "resume_from_checkpoint": "JOB_RUN_ID (a rerun with the same id resumes)",
    "save_strategy": "JOB_TRAIN__SAVE_STEPS",
    "eval_strategy": "JOB_TRAIN__EVAL_STEPS",
    "save_only_model": "nothing (checkpoints always hold the optimizer state, which exact resume needs)",
    "save_total_limit": "nothing (one complete checkpoint is kept in storage)",
    "use_cpu": "nothing (the job uses the GPU when there is one)",
    "disable_tqdm": "JOB_LOG_FORMAT",
    "push_to_hub": "JOB_OUTPUT=hf://org/repo",
    "hub_model_id": "JOB_OUTPUT=hf://org/repo",
    "hub_token": "HF_TOKEN",
    "gradient_checkpointing": "JOB_TRAIN__GRADIENT_CHECKPOINTING",
    "activation_checkpointing": "JOB_TRAIN__GRADIENT_CHECKPOINTING",
    "warmup_steps": "JOB_TRAIN__WARMUP_RATIO",
    "truncation_mode": "JOB_TRAIN__OVER_LENGTH (the job's length policy)",
    "completion_only_loss": "nothing (the loss covers the answer and its EOS only)",
    "assistant_only_loss": "nothing (the loss covers the answer and its EOS only)",
    "padding_free": "JOB_TRAIN__PACKING",
    "dataset_text_field": "JOB_COLUMNS__*",
    "dataset_kwargs": "nothing (the job prepares the dataset itself)",
    "dataset_num_proc": "nothing",
    "remove_unused_columns": "nothing",
    "max_prompt_length": "JOB_TRAIN__MAX_LENGTH with JOB_TRAIN__OVER_LENGTH",
    "max_completion_length": "JOB_TRAIN__MAX_LENGTH with JOB_TRAIN__OVER_LENGTH",
    "pad_token": "nothing (the tokenizer's)",
}

@dataclass(frozen=True)
class Runtime:
    """What is known only on the machine that trains (or, for validation, a neutral CPU stand-in)."""

    output_dir: str = "/nonexistent/qlora-job-validation"
    cuda: bool = False
    has_eval: bool = False
    progress_bar: bool = False
    checkpointing: bool = True
    liger: bool = False
    #: what `JOB_TRAIN__BF16=auto` means here: a GPU that supports it
    bf16: bool = False
    #: rows per micro-batch (JOB_TRAIN__MERGE_MICRO_BATCHES; job/stages/common.py): the step's rows stay as set
    micro_batch: int | None = None


def config_class(stage: str):
    if stage == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import SFTConfig

    return SFTConfig


@functools.cache
def _fields(cls) -> dict[str, object]:
    """name -> resolved type of every init field of a TRL config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init}


def _coerce(tp, raw):
    """An environment string as a value of the dataclass field's type (`a,b` is a list; JSON for dicts)."""
    from pydantic import TypeAdapter

    if isinstance(raw, str):
        origins = {typing.get_origin(t) or t for t in (typing.get_args(tp) or (tp,))}
        if (list in origins or tuple in origins) and not raw.lstrip().startswith("["):
            raw = [x.strip() for x in raw.split(",") if x.strip()]
        elif dict in origins and raw.lstrip().startswith("{"):
            raw = json.loads(raw)
        elif raw.strip().lower() in ("none", "null") and type(None) in typing.get_args(tp):
            raw = None
    try:
        return TypeAdapter(tp).validate_python(raw)
    except Exception:
        # Some fields are typed loosely in ways pydantic can't model (enums as `str | SomeEnum`): TRL checks them itself.
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            for arg in typing.get_args(tp):
                if arg is str and isinstance(raw, str):
                    return raw
        raise


def extras(group) -> dict[str, object]:
    """The extra (non-typed) fields a settings group received, as given."""
    return dict(group.model_extra or {})


def _name_problem(var: str, group: str, name: str, stage: str | None) -> str | None:
    if name in MANAGED:
        return f"{var}: set by the job; use {MANAGED[name]}"
    stages = [stage] if stage else ["sft", "dpo"]
    if group == "dpo":
        stages = ["dpo"]
    fields = set().union(*(_fields(config_class(st)) for st in stages))
    if name in fields:
        return None
    import difflib

    close = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.75)
    hint = f" (did you mean JOB_{group.upper()}__{close[0].upper()}?)" if close else ""
    names = " or ".join(config_class(st).__name__ for st in stages)
    return f"{var}: unknown variable: not a field of TRL's {names}{hint}"


def name_problems(variables: list[tuple[str, str, str]], stage: str | None) -> list[str]:
    """(variable, group, field) names beyond the job's own fields that are not fields of the stage's TRL config."""
    return [p for var, group, name in variables if (p := _name_problem(var, group, name, stage))]


def stage_kwargs(s, stage: str | None = None) -> dict:
    """User-set extra fields for the stage's config class, converted to their types. Raises ValueError("NAME: why")."""
    stage = stage or s.stage
    fields = _fields(config_class(stage))
    out = {}
    groups = [("TRAIN", s.train)] + ([("DPO", s.dpo)] if stage == "dpo" else [])
    for prefix, group in groups:
        for name, raw in extras(group).items():
            var = f"JOB_{prefix}__{name.upper()}"
            problem = _name_problem(var, prefix.lower(), name, stage)
            if problem:
                raise ValueError(problem)
            try:
                out[name] = _coerce(fields[name], raw)
                if isinstance(out[name], float) and not math.isfinite(out[name]):
                    raise ValueError("not a finite number")
            except Exception as exc:
                errors = getattr(exc, "errors", None)
                msg = errors()[0]["msg"] if callable(errors) else _message(exc)
                raise ValueError(f"{var}: invalid value {raw!r} ({msg}; TRL's type: {fields[name]})") from None
    return out


def build_kwargs(s, rt: Runtime) -> dict:
    """Every argument of the stage's config class that the job sets, then the user's extra fields on top."""
    t = s.train
    bf16 = {"true": True, "false": False}.get(t.bf16, rt.bf16)
    optim = t.optim if t.optim != "auto" else ("adamw_torch_fused" if rt.cuda else "adamw_torch")
    step = t.per_device_train_batch_size * t.gradient_accumulation_steps  # rows per optimizer step (per process)
    rows = rt.micro_batch or t.per_device_train_batch_size
    if step % rows:
        raise ValueError(f"a micro-batch of {rows} rows does not divide a step of {step} rows")
    kw = dict(
        output_dir=rt.output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=step // rows,
        # The job's length policy has already made every example fit (job/sequences.py); TRL's own truncation is a no-op.
        max_length=t.max_length,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # A NaN or infinite step loss is logged as such (job/divergence.py ends the run on it), not averaged away:
        # transformers' filter showed a run whose every loss was NaN as loss 0.0.
        logging_nan_inf_filter=False,
        report_to=[] if t.report_to == "none" else t.report_to.split(","),
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_only_model=False,  # optimizer and RNG state are what make a resumed run continue exactly
        eval_strategy=("steps" if t.eval_steps else "no") if rt.has_eval else "no",
        eval_steps=t.eval_steps or None,
        activation_checkpointing=rt.checkpointing,
        # Non-reentrant checkpointing works with frozen 4-bit inputs and is what PyTorch recommends.
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=rt.liger,
        use_cpu=not rt.cuda,
        disable_tqdm=not rt.progress_bar,
        dataloader_pin_memory=rt.cuda,
        ddp_find_unused_parameters=False,
        # DDP would re-send every registered buffer from rank 0 before each forward: the dequantized copy of the base
        # is one (24 GiB per micro-batch at 13B), RoPE's inv_freq another. None of them changes during training.
        ddp_broadcast_buffers=False,
        remove_unused_columns=True,
        dataset_num_proc=1,
    )
    if s.stage == "dpo":
        kw.update(beta=s.dpo.beta, loss_type=[s.dpo.loss_type])
    else:
        kw.update(
            # Prompt-completion data: the loss covers the completion only, which ends with the template's EOS.
            completion_only_loss=True,
            # Best-fit-decreasing packing: several examples per row, no padding, and position ids that restart at
            # each example so attention never crosses examples (padding-free).
            packing=t.packing,
            packing_strategy="bfd",
            padding_free=t.packing,
            eos_token=t.eos_token,
        )
    kw.update(stage_kwargs(s))
    return kw


def build(s, rt: Runtime):
    """The stage's TRL config (SFTConfig or DPOConfig)."""
    return config_class(s.stage)(**build_kwargs(s, rt))


@functools.cache
def dpo_loss_types() -> frozenset[str]:
    """The loss types TRL's DPOTrainer implements, read from its own loss function (it checks them only mid-training)."""
    from trl import DPOTrainer

    return frozenset(re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer)))


def _report_to_problems(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    out = []
    for name in report_to.split(","):
        if name in ("all",):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            out.append(f"JOB_TRAIN__REPORT_TO: unknown integration {name!r}; known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        elif name not in available and name != "kubeflow":
            out.append(f"JOB_TRAIN__REPORT_TO: {name!r} is not installed in this environment (pip install {name}), "
                       "or remove it")
    return out


def problems(s) -> list[str]:
    """Every problem TRL and transformers would raise for these settings, each naming its variable; [] when fine.

    The config is built once; when it fails, each user-set value is tried alone over the defaults to name the
    culprit (TRL's messages name its own fields, not our variables)."""
    out = _report_to_problems(s.train.report_to)
    if s.stage == "dpo" and s.dpo.loss_type not in dpo_loss_types():
        out.append(f"JOB_DPO__LOSS_TYPE: unknown loss type {s.dpo.loss_type!r}; TRL's DPO has "
                   f"{', '.join(sorted(dpo_loss_types()))}")
    try:
        stage_kwargs(s)
    except ValueError as exc:
        return out + [str(exc)]
    if out:
        return out
    try:
        build(s, Runtime())
        return []
    except Exception as exc:  # noqa: BLE001 - TRL and transformers raise ValueError, TypeError, ImportError ...
        first = exc
    culprits = []
    for group_name in ("train", "dpo"):
        group = getattr(s, group_name)
        cls = type(group)
        default = cls()
        for name in list(cls.model_fields) + list(extras(group)):
            value = getattr(group, name)
            if name in cls.model_fields and value == getattr(default, name):
                continue
            # This one value over the defaults: does TRL refuse it alone?
            trial = s.model_copy(update={"train": type(s.train)(), "dpo": type(s.dpo)(),
                                         group_name: cls.model_validate({name: value})})
            try:
                build(trial, Runtime())
            except Exception as exc:  # noqa: BLE001
                culprits.append(f"JOB_{group_name.upper()}__{name.upper()}: {_message(exc)}")
    return culprits or [f"JOB_TRAIN__*: TRL refused the training arguments: {_message(first)}"]


def _message(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__

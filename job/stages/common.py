"""The one place where JOB_TRAIN__* settings become TRL/transformers training arguments (shared by sft and dpo)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from job.settings import JobSettings


def training_args(s: JobSettings, checkpoint_dir: Path, *, has_eval: bool, progress_bar: bool) -> dict:
    t = s.train
    cuda = torch.cuda.is_available()
    bf16 = {"true": True, "false": False}.get(t.bf16, cuda and torch.cuda.is_bf16_supported())
    optim = t.optim if t.optim != "auto" else ("adamw_torch_fused" if cuda else "adamw_torch")
    return dict(
        output_dir=str(checkpoint_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
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
        report_to=[] if t.report_to == "none" else t.report_to.split(","),
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_only_model=False,  # optimizer and RNG state are what make a resumed run continue exactly
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps or None,
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen 4-bit inputs and is what PyTorch recommends.
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=t.use_liger_kernel and cuda and importlib.util.find_spec("liger_kernel") is not None,
        use_cpu=not cuda,
        disable_tqdm=not progress_bar,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        remove_unused_columns=True,
    )

"""The one place where JOB_TRAIN__* settings become TRL/transformers training arguments (shared by sft and dpo)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from job.settings import JobSettings

log = logging.getLogger("job")


class StepSortedSampler(torch.utils.data.Sampler):
    """Each optimizer step's examples drawn at random, then ordered longest first so that each micro-batch holds
    examples of similar length and pads less.

    A seeded permutation is cut into steps of `step` examples (micro-batch x accumulation x processes); a step holds
    exactly the examples random sampling would give it, and every micro-batch keeps its size, so a step's gradient is
    the same (padding is masked) for less compute. transformers' `group_by_length` changes which examples share a step,
    and its `batch_rebalance` varies micro-batch sizes, which reweights examples in a mean-reduced loss such as DPO's.
    Deterministic per seed and epoch, as resuming mid-epoch and every data-parallel rank need.
    """

    def __init__(self, lengths: list[int], step: int, seed: int):
        self.lengths, self.step, self.seed, self.epoch = list(lengths), max(1, step), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for i in range(0, len(order), self.step):
            yield from sorted(order[i : i + self.step], key=lambda j: -self.lengths[j])


def step_sorted_sampler(args, lengths: list[int]) -> StepSortedSampler:
    """The sampler for a trainer with these TrainingArguments (one optimizer step = batch x accumulation x world)."""
    step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return StepSortedSampler(lengths, step, args.data_seed if args.data_seed is not None else args.seed)


def make_trainer(trainer_cls, s: JobSettings, model, args, tokenizer, train_ds, eval_ds, callbacks, padded_lengths):
    """TRL's trainer for a stage, with a new LoRA adapter (or the PeftModel's own, from JOB_ADAPTER) and length-sorted
    micro-batches. `padded_lengths(args, dataset)` is each example's padded length, or None where nothing is padded
    (packed SFT): then the trainer's own sampler."""
    from job.model import lora_config

    class Trainer(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            lengths = padded_lengths(self.args, self.train_dataset if train_dataset is None else train_dataset)
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return step_sorted_sampler(self.args, lengths)

    # A PeftModel (JOB_ADAPTER) keeps training its adapter (DPO: TRL copies it into a frozen "ref" adapter).
    peft_config = None if hasattr(model, "peft_config") else lora_config(s.lora)
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                   peft_config=peft_config, callbacks=callbacks)


def activation_bytes_per_token(config, liger: bool) -> int | None:
    """Activations one token keeps per decoder stack for the backward pass without checkpointing (bf16, LoRA with
    dropout on every projection), for a Llama-like config; None when the config does not say. Measured: 13B 9.7 MiB,
    1.8B 2.9 MiB per token; this estimate is 4-13% above both."""
    h, i, n = (getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    if not (isinstance(h, int) and isinstance(i, int) and isinstance(n, int)):
        return None
    # saved inputs of norms, projections, LoRA dropouts (and masks), attention; MLP gate/up/down inputs.
    # Without Liger's kernels, RMSNorm keeps fp32 copies and the MLP and RoPE more intermediates.
    per_layer = 16 * h + 4.5 * i if liger else 26 * h + 5.5 * i
    return int(2 * n * per_layer)


def use_checkpointing(s: JobSettings, model, sequences_per_example: int, liger: bool) -> bool:
    """JOB_TRAIN__GRADIENT_CHECKPOINTING, with `auto` decided from the free GPU memory once the model is loaded."""
    setting = s.train.gradient_checkpointing
    if setting != "auto":
        return setting == "true"
    if not torch.cuda.is_available() or model is None:
        return True
    per_token = activation_bytes_per_token(getattr(model, "config", None), liger)
    if per_token is None:
        return True
    # The largest micro-batch: packed SFT rows are full; DPO's chosen and rejected rows are each up to MAX_LENGTH.
    tokens = s.train.per_device_train_batch_size * sequences_per_example * s.train.max_length
    need = tokens * per_token + 2 * 2**30  # + optimizer state, LM-head chunks, allocator slack
    free, _ = torch.cuda.mem_get_info(next(model.parameters()).device)
    on = need > 0.9 * free
    log.info("gradient checkpointing %s: a micro-batch of up to %d tokens needs ~%.1f GiB of activations, %.1f GiB free",
             "on" if on else "off", tokens, need / 2**30, free / 2**30)
    return on


def training_args(s: JobSettings, checkpoint_dir: Path, *, has_eval: bool, progress_bar: bool, model=None,
                  sequences_per_example: int = 1) -> dict:
    t = s.train
    cuda = torch.cuda.is_available()
    bf16 = {"true": True, "false": False}.get(t.bf16, cuda and torch.cuda.is_bf16_supported())
    optim = t.optim if t.optim != "auto" else ("adamw_torch_fused" if cuda else "adamw_torch")
    liger = t.use_liger_kernel and cuda and importlib.util.find_spec("liger_kernel") is not None
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
        activation_checkpointing=use_checkpointing(s, model, sequences_per_example, liger),
        # Non-reentrant checkpointing works with frozen 4-bit inputs and is what PyTorch recommends.
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger,
        use_cpu=not cuda,
        disable_tqdm=not progress_bar,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        remove_unused_columns=True,
    )

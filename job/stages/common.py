"""The one place where JOB_TRAIN__* settings become TRL/transformers training arguments (shared by sft and dpo)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from job import fastpaths, lora, memplan, offload, padfree
from job.errors import ConfigError
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


#: Written into every checkpoint beside the trainer's own state: what transformers does not restore on resume.
JOB_STATE = "job_state.json"


def make_trainer(trainer_cls, s: JobSettings, model, args, tokenizer, train_rows, eval_rows, callbacks, padded_lengths, *,
                 memory: memplan.MemoryPlan, identity: str | None = None):
    """TRL's trainer for a stage, on the job's tokenized rows (job/sequences.py), with a new LoRA adapter (or the
    PeftModel's own, from JOB_ADAPTER), fp32 trainable weights and length-sorted micro-batches; `memory`: job/memplan.py's
    plan (the 4-bit base dequantized once, checkpointed layer inputs offloaded), reported in metrics.json.

    `padded_lengths(args, dataset)` is each example's padded length, or None where nothing is padded (packed SFT): then
    the trainer's own sampler."""
    import json

    from datasets import Dataset

    from job.model import lora_config

    class Trainer(trainer_cls):
        def __init__(self, *a, **kw):
            # TRL casts QLoRA's trainable weights to bf16 (QLoRA paper, section 3), with no fp32 master copy: at DPO's
            # learning rates most AdamW updates then round away. The job keeps them in fp32 (compute stays bf16 under
            # autocast): a continued adapter keeps its exact saved values, a new one is upcast after TRL creates it.
            given = kw["model"]
            exact = {n: p.detach().to(torch.float32, copy=True) for n, p in given.named_parameters()
                     if p.requires_grad} if hasattr(given, "peft_config") else {}
            super().__init__(*a, **kw)
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    p.data = exact[name].to(p.device) if name in exact else p.data.to(torch.float32)
            self.job_resumed = {"step": 0, "tokens": 0}
            self.job_rows_seen = 0  # training rows this session (DPO: a chosen and a rejected row per pair)
            self.job_offload = False  # JOB_TRAIN__OFFLOAD_CHECKPOINTS in effect (set below)

        def training_step(self, model, inputs, *a, **kw):
            self.job_rows_seen += len(inputs["input_ids"])
            with offload.during_step(self.job_offload):
                return super().training_step(model, inputs, *a, **kw)

        def _prepare_dataset(self, dataset, *a, **kw):
            if "prompt_ids" in dataset.column_names:  # DPO rows the job tokenized and fitted itself
                return dataset
            return super()._prepare_dataset(dataset, *a, **kw)

        def _get_train_sampler(self, train_dataset=None):
            lengths = padded_lengths(self.args, self.train_dataset if train_dataset is None else train_dataset)
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return step_sorted_sampler(self.args, lengths)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # TRL's token counter restarts at 0 in a new process; the checkpoint carries it (and which run it belongs to).
            # One writer (every rank rewriting the same file could leave it cut short for the upload), all at once.
            if self.is_world_process_zero():
                folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
                part = folder / (JOB_STATE + ".part")
                part.write_text(json.dumps({"step": self.state.global_step, "identity": identity,
                                            "total_train_tokens": int(self._total_train_tokens)}) + "\n")
                part.replace(folder / JOB_STATE)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            saved = Path(resume_from_checkpoint) / JOB_STATE
            if saved.exists():
                job_state = json.loads(saved.read_text())
                self._total_train_tokens = job_state["total_train_tokens"]
                self.job_resumed = {"step": job_state["step"], "tokens": job_state["total_train_tokens"]}
            # PEFT reloads the adapter in its own dtype choice: keep the trainable weights fp32 (exact resume).
            for p in (model or self.model).parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.to(torch.float32)

        def create_optimizer(self, model=None):
            # LoRA+ (JOB_TRAIN__LORAPLUS_LR_RATIO): the optimizer JOB_TRAIN__OPTIM names, with PEFT's parameter groups
            # (B at ratio x the learning rate); the scheduler scales every group's rate alike.
            ratio = s.train.loraplus_lr_ratio
            if ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from peft.optimizers import create_loraplus_optimizer
            from transformers.trainer_optimizer import is_optimizer_factory

            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ConfigError(f"JOB_TRAIN__LORAPLUS_LR_RATIO: JOB_TRAIN__OPTIM={self.args.optim} chooses its own "
                                  "parameter groups, so LoRA+ can't set B's learning rate; use an Adam-like optimizer")
            kwargs = dict(kwargs)
            log.info("LoRA+: B matrices at %g x the learning rate (JOB_TRAIN__LORAPLUS_LR_RATIO), %s", ratio,
                     optimizer_cls.__name__)
            self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, lr=kwargs.pop("lr", self.args.learning_rate),
                                                       loraplus_lr_ratio=ratio, loraplus_weight_decay=self.args.weight_decay,
                                                       **kwargs)
            return self.optimizer

        def _run_epoch(self, *args, **kwargs):
            # transformers checks the step budget only after a step: resumed from a checkpoint already at the end (the
            # final checkpoint of a run stopped during its final upload), it would train one step more than asked.
            if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
                self.control.should_training_stop = True
                return
            return super()._run_epoch(*args, **kwargs)

    # A PeftModel (JOB_ADAPTER) keeps training its adapter (DPO: TRL copies it into a frozen "ref" adapter).
    peft_config = None if hasattr(model, "peft_config") else lora_config(s.lora, s.quant)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)
    trainer.job_offload = bool(memory.offload and trainer.args.activation_checkpointing and torch.cuda.is_available())
    if trainer.job_offload:
        log.info("checkpointed layer inputs kept in pinned CPU memory until the backward (JOB_TRAIN__OFFLOAD_CHECKPOINTS=%s)",
                 s.train.offload_checkpoints)
    elif s.train.offload_checkpoints == "true":
        log.info("JOB_TRAIN__OFFLOAD_CHECKPOINTS has no effect here: it applies with gradient checkpointing on a GPU")
    trainer.job_memory_plan = memory.report
    # Read by metrics.json: what this run kept in GPU memory to go faster.
    trainer.job_dequantized_gib = None
    keep_dequantized = memory.dequantized
    if keep_dequantized:
        from job.model import keep_dequantized as keep

        trainer.job_dequantized_gib = round(keep(trainer.model) / 2**30, 3)
        log.info("4-bit base weights dequantized once: a %.1f GiB copy in %s (JOB_QUANT__KEEP_DEQUANTIZED=%s)",
                 trainer.job_dequantized_gib, s.quant.compute_dtype, s.quant.keep_dequantized)
    # Every fast path as job/fastpaths.py decides it for this model and device (the table --check showed).
    fast = fastpaths.for_model(s, model, next(trainer.model.parameters()).device)
    # DPO's chosen and rejected rows as one row without padding (job/padfree.py); JOB_TRAIN__PACKING=false: TRL's padding.
    trainer.job_padding_free = s.stage == "dpo" and fast.padding_free
    if trainer.job_padding_free:
        trainer.data_collator = padfree.Collator(trainer.data_collator)
        for m in (trainer.model, trainer.ref_model):
            if m is not None:
                padfree.install(m)
    lean = lora.make_lean(trainer.model) if lora.LEAN else 0
    applies = [lora.lean_forward_applies(c) for c in (getattr(trainer.model, "peft_config", None) or {}).values()]
    why = next((why for ok, why in applies if not ok), None) or (
        f"{lean} of {len(lora.lora_layers(trainer.model))} LoRA layers ({applies[0][1] if applies else 'plain LoRA'}); "
        "PEFT's forward where the call is not the training one (no autocast, adapters off)")
    fast.set("lean_lora", lean > 0, why if lora.LEAN else "switched off (bench)")
    fast.set("dequantized_copy", keep_dequantized, "the memory plan: " + (
        f"{trainer.job_dequantized_gib} GiB" if keep_dequantized else "not kept"))
    fast.set("offloaded_checkpoints", trainer.job_offload, "the memory plan: with checkpointing on a GPU"
             if trainer.job_offload else "off (the memory plan; it needs checkpointing and a GPU)")
    trainer.job_fast_paths = fast
    log.info("fast paths: %s", ", ".join(f"{k} {'on' if v['on'] else 'off'}" for k, v in fast.report().items()),
             extra={"fields": {"event": "fast_paths", "fast_paths": fast.report()}})
    return trainer


def memory_plan(s: JobSettings, model, train_rows: list[dict] | None = None, *, checkpointing: bool | None = None,
                keep_dequantized: bool | None = None, micro_batch_rows: int | None = None,
                offload: bool | None = None) -> memplan.MemoryPlan:
    """job/memplan.py's plan for this machine, the model loaded; a given value (a retry after running out of memory)
    overrides its own choice. The same plan on every process."""
    from job.model import dequantized_bytes

    cuda = torch.cuda.is_available() and model is not None
    work = memplan.workload(s, train_rows, _world_size(), padding_free=_padding_free(s, model))
    free = torch.cuda.mem_get_info(next(model.parameters()).device)[0] if cuda else None
    copy = dequantized_bytes(model) if cuda and s.quant.load_in == "4bit" else 0
    trainable = memplan.adapter_parameters(s, model) if cuda else 0
    plan = memplan.choose(s, model, work, liger=memplan.liger_on(s), cuda=cuda, free=free, copy_bytes=copy,
                          trainable=trainable, checkpointing=checkpointing, keep_dequantized=keep_dequantized,
                          micro_batch_rows=micro_batch_rows, offload=offload)
    if plan.report is not None and cuda:
        plan.report["allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    return memplan.same_on_every_process(plan)


def _world_size() -> int:
    """Processes in this run's process group (accelerate's state would set a device up: the planner only counts)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _padding_free(s: JobSettings, model) -> bool:
    """DPO's micro-batches without padding (job/padfree.py): as job/fastpaths.py decides for this model."""
    if s.stage != "dpo" or not s.train.packing or model is None:
        return False
    try:
        return bool(fastpaths.for_model(s, model, next(model.parameters()).device).padding_free)
    except Exception:  # noqa: BLE001 - the planner then assumes padded micro-batches (more memory, never less)
        return False


def training_args(s: JobSettings, checkpoint_dir: Path, *, has_eval: bool, progress_bar: bool, model=None,
                  checkpointing: bool | None = None, memory: memplan.MemoryPlan | None = None):
    """The stage's TRL config for this machine (job/trainargs.py maps the settings); `memory`: memory_plan's choices."""
    from job import trainargs

    cuda = torch.cuda.is_available()
    if memory is None:
        memory = memory_plan(s, model, checkpointing=checkpointing)
    rt = trainargs.Runtime(output_dir=str(checkpoint_dir), cuda=cuda, has_eval=has_eval, progress_bar=progress_bar,
                           checkpointing=memory.checkpointing, liger=memplan.liger_on(s),
                           bf16=cuda and torch.cuda.is_bf16_supported(), micro_batch=memory.micro_batch)
    return trainargs.build(s, rt)

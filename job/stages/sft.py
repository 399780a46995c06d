"""Supervised fine-tuning: TRL's SFTTrainer on prompt/answer pairs, loss on the answer tokens (and EOS) only.

    JOB_STAGE=sft JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b JOB_DATA=s3://bucket/sft.jsonl JOB_OUTPUT=s3://bucket/runs \
        python -m job
"""

from __future__ import annotations

from pathlib import Path

from job.settings import JobSettings
from job.stages.common import step_sorted_sampler, training_args


def build_trainer(s: JobSettings, model, tokenizer, train_ds, eval_ds, checkpoint_dir: Path, callbacks, *, progress_bar: bool):
    from trl import SFTConfig, SFTTrainer

    from job.model import lora_config

    args = SFTConfig(
        **training_args(s, checkpoint_dir, has_eval=eval_ds is not None, progress_bar=progress_bar, model=model),
        # Prompt-completion data: the loss covers the completion only, which ends with the template's EOS.
        completion_only_loss=True,
        # Best-fit-decreasing packing: several examples per row, no padding, and position ids that restart at
        # each example so attention never crosses examples (padding-free).
        packing=s.train.packing,
        packing_strategy="bfd",
        padding_free=s.train.packing,
        dataset_num_proc=1,
    )
    peft_config = None if hasattr(model, "peft_config") else lora_config(s.lora)

    class Trainer(SFTTrainer):
        # Without packing, rows are padded to the longest in a micro-batch: group similar lengths within each step
        # (the same examples per step; the loss is normalised per step, so the gradient is unchanged).
        def _get_train_sampler(self, train_dataset=None):
            ds = self.train_dataset if train_dataset is None else train_dataset
            if self.args.packing:
                return super()._get_train_sampler(train_dataset)
            return step_sorted_sampler(self.args, [min(len(x), self.args.max_length) for x in ds["input_ids"]])

    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

"""Supervised fine-tuning: TRL's SFTTrainer on prompt/answer pairs, loss on the answer tokens (and EOS) only.

    JOB_STAGE=sft JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b JOB_DATA=s3://bucket/sft.jsonl JOB_OUTPUT=s3://bucket/runs \
        python -m job
"""

from __future__ import annotations

from pathlib import Path

from job.settings import JobSettings
from job.stages.common import make_trainer, training_args


def example_lengths(args, dataset) -> list[int] | None:
    """Padded length of each tokenized example; None when packed (no padding: TRL's own sampler)."""
    return None if args.packing else [min(len(x), args.max_length) for x in dataset["input_ids"]]


def build_trainer(s: JobSettings, model, tokenizer, train_ds, eval_ds, checkpoint_dir: Path, callbacks, *, progress_bar: bool):
    from trl import SFTConfig, SFTTrainer

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
    return make_trainer(SFTTrainer, s, model, args, tokenizer, train_ds, eval_ds, callbacks, example_lengths)

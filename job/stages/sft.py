"""Supervised fine-tuning: TRL's SFTTrainer on prompt/answer pairs, loss on the answer tokens and its EOS only.

    JOB_STAGE=sft JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b JOB_DATA=s3://bucket/sft.jsonl JOB_OUTPUT=s3://bucket/runs \
        python -m job
"""

from __future__ import annotations

from pathlib import Path

from job.settings import JobSettings
from job.stages.common import make_trainer, memory_plan, training_args


def example_lengths(args, dataset) -> list[int] | None:
    """Padded length of each tokenized example; None when packed (no padding: TRL's own sampler)."""
    return None if args.packing else [len(x) for x in dataset["input_ids"]]


def build_trainer(s: JobSettings, model, tokenizer, train_rows, eval_rows, checkpoint_dir: Path, callbacks, *,
                  progress_bar: bool, checkpointing: bool | None = None, keep_dequantized: bool | None = None,
                  micro_batch_rows: int | None = None, offload: bool | None = None, identity: str | None = None):
    """`train_rows`/`eval_rows`: job/sequences.py's fitted rows (input_ids, completion_mask), already within
    JOB_TRAIN__MAX_LENGTH; TRL builds the labels from the completion mask and packs them."""
    from trl import SFTTrainer

    memory = memory_plan(s, model, train_rows, checkpointing=checkpointing, keep_dequantized=keep_dequantized,
                         micro_batch_rows=micro_batch_rows, offload=offload)
    args = training_args(s, checkpoint_dir, has_eval=bool(eval_rows), progress_bar=progress_bar, memory=memory)
    return make_trainer(SFTTrainer, s, model, args, tokenizer, train_rows, eval_rows, callbacks, example_lengths,
                        memory=memory, identity=identity)

"""Direct preference optimisation: TRL's DPOTrainer on prompt/chosen/rejected triples.

With JOB_ADAPTER (e.g. the SFT run's adapter) the policy starts from that adapter and the reference is a frozen copy
of it (TRL's "ref" adapter), not the bare base model; without it a new LoRA adapter is trained against the base.

    JOB_STAGE=dpo JOB_ADAPTER=s3://bucket/runs/sft-v1/adapter/ JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b \
        JOB_DATA=s3://bucket/preferences.csv JOB_OUTPUT=s3://bucket/runs python -m job
"""

from __future__ import annotations

from pathlib import Path

from job.settings import JobSettings
from job.stages.common import make_trainer, memory_plan, training_args


def pair_lengths(args, dataset) -> list[int]:
    """Padded length of each tokenized pair: chosen and rejected rows share a batch, each prompt + answer."""
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


def build_trainer(s: JobSettings, model, tokenizer, train_rows, eval_rows, checkpoint_dir: Path, callbacks, *,
                  progress_bar: bool, checkpointing: bool | None = None, keep_dequantized: bool | None = None,
                  micro_batch_rows: int | None = None, offload: bool | None = None, identity: str | None = None):
    """`train_rows`/`eval_rows`: job/sequences.py's fitted rows (prompt_ids, chosen_ids, rejected_ids), already within
    JOB_TRAIN__MAX_LENGTH with both answers whole."""
    from trl import DPOTrainer

    memory = memory_plan(s, model, train_rows, checkpointing=checkpointing, keep_dequantized=keep_dequantized,
                         micro_batch_rows=micro_batch_rows, offload=offload)
    args = training_args(s, checkpoint_dir, has_eval=bool(eval_rows), progress_bar=progress_bar, memory=memory)
    return make_trainer(DPOTrainer, s, model, args, tokenizer, train_rows, eval_rows, callbacks, pair_lengths,
                        memory=memory, identity=identity)

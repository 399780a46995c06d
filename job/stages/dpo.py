"""Direct preference optimisation: TRL's DPOTrainer on prompt/chosen/rejected triples.

With JOB_ADAPTER (e.g. the SFT run's adapter) the policy starts from that adapter and the reference is a frozen copy
of it (TRL's "ref" adapter), not the bare base model; without it a new LoRA adapter is trained against the base.

    JOB_STAGE=dpo JOB_ADAPTER=s3://bucket/runs/sft-v1/adapter/ JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b \
        JOB_DATA=s3://bucket/preferences.csv JOB_OUTPUT=s3://bucket/runs python -m job
"""

from __future__ import annotations

from pathlib import Path

from job.settings import JobSettings
from job.stages.common import step_sorted_sampler, training_args


def pair_lengths(dataset, max_length: int) -> list[int]:
    """Padded length of each tokenized pair: chosen and rejected rows share a batch, each prompt + answer."""
    return [min(max_length, len(p) + max(len(c), len(r)))
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


def build_trainer(s: JobSettings, model, tokenizer, train_ds, eval_ds, checkpoint_dir: Path, callbacks, *, progress_bar: bool):
    from trl import DPOConfig, DPOTrainer

    from job.model import lora_config

    args = DPOConfig(
        **training_args(s, checkpoint_dir, has_eval=eval_ds is not None, progress_bar=progress_bar, model=model,
                        sequences_per_example=2),  # chosen and rejected
        beta=s.dpo.beta,
        loss_type=[s.dpo.loss_type],
        dataset_num_proc=1,
    )
    # A PeftModel (JOB_ADAPTER) makes TRL copy its adapter into a frozen "ref" adapter; a bare model gets a new one.
    peft_config = None if hasattr(model, "peft_config") else lora_config(s.lora)

    class Trainer(DPOTrainer):
        # Rows are padded to the longest in a micro-batch: group similar lengths within each step (same gradient).
        def _get_train_sampler(self, train_dataset=None):
            ds = self.train_dataset if train_dataset is None else train_dataset
            return step_sorted_sampler(self.args, pair_lengths(ds, self.args.max_length))

    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

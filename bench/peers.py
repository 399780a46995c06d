"""What a knowledgeable user would run instead of the job, as plain library code (no job code): the benchmark's peers.

* `trl_best`: stock TRL 1.16 at its best for QLoRA SFT on one large GPU: NF4 + double quantization with bf16
  compute (the job's), packing (best-fit) + padding-free, Liger kernels, bf16, fused AdamW, transformers' default
  attention (sdpa), LoRA r=16 alpha=32 dropout 0.05 on every linear layer (the job's), the job's batch layout
  (4 packed rows of 1,024 tokens per micro-batch, 4 micro-batches per step); checkpointing off (`trl_best`) or on
  (`trl_best_gc`). DPO: the same model, LoRA and precision, DPOTrainer's defaults, 4 pairs per micro-batch, 4 per step.
* Unsloth runs in an environment of its own (bench/unsloth_peer.py).

    from peers import trl_sft_trainer
    trainer = trl_sft_trainer(model_dir, records, out_dir, max_steps=10, checkpointing=False)
"""

from __future__ import annotations

import torch

#: The instruction format the job uses when a model has no chat template (job/model.py's INSTRUCTION_TEMPLATE),
#: written out as strings so that the peers train on exactly the job's tokens.
PROMPT = "{bos}### 指示\n{prompt}\n### 回答\n"
COMPLETION = "{answer}{eos}"

#: (max_length, per-device batch, accumulation): packed rows of max_length tokens.
JOB_LAYOUT = (1024, 4, 4)


def load_4bit(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16) if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16 if bnb else torch.float32,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def sft_rows(records: list[dict], tok) -> dict:
    """The seed's records ({"text", "output"}) as prompt/completion strings in the job's format."""
    bos, eos = tok.bos_token or "", tok.eos_token
    return {"prompt": [PROMPT.format(bos=bos, prompt=r["text"]) for r in records],
            "completion": [COMPLETION.format(answer=r["output"], eos=eos) for r in records]}


def dpo_rows(records: list[dict], tok) -> dict:
    """The preference records ({"prompt", "chosen", "rejected"}) as strings in the job's format."""
    return {"prompt": [PROMPT.format(bos=tok.bos_token or "", prompt=r["prompt"]) for r in records],
            "chosen": [COMPLETION.format(answer=r["chosen"], eos=tok.eos_token) for r in records],
            "rejected": [COMPLETION.format(answer=r["rejected"], eos=tok.eos_token) for r in records]}


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")


def _common(out_dir: str, max_steps: int, checkpointing: bool, batch: int, accumulation: int) -> dict:
    cuda = torch.cuda.is_available()
    return dict(output_dir=out_dir, max_steps=max_steps, num_train_epochs=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=1, save_strategy="no",
                report_to="none", seed=42, bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
                gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
                use_liger_kernel=cuda, use_cpu=not cuda, dataset_num_proc=1)


def trl_sft_trainer(model_dir: str, records: list[dict], out_dir: str, *, max_steps: int, checkpointing: bool,
                    layout: tuple[int, int, int] = JOB_LAYOUT, callbacks=()):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = load_4bit(model_dir)
    max_length, batch, accumulation = layout
    args = SFTConfig(**_common(out_dir, max_steps, checkpointing, batch, accumulation), max_length=max_length,
                     packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(sft_rows(records, tok)), processing_class=tok,
                      peft_config=_lora(), callbacks=list(callbacks))


def trl_dpo_trainer(model_dir: str, records: list[dict], out_dir: str, *, max_steps: int, checkpointing: bool,
                    layout: tuple[int, int, int] = JOB_LAYOUT, callbacks=()):
    """records: {"prompt", "chosen", "rejected"} strings (bench/synth.py's)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = load_4bit(model_dir)
    max_length, batch, accumulation = layout
    args = DPOConfig(**_common(out_dir, max_steps, checkpointing, batch, accumulation), max_length=max_length, beta=0.1)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(dpo_rows(records, tok)), processing_class=tok, peft_config=_lora(),
                      callbacks=list(callbacks))

"""The seed article's recipe, as a plain TRL script (no job code): the baseline of the benchmark.

It mirrors the article's notebook as it runs on today's libraries (TRL 1.x, transformers 5.x):

* model: `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=torch.bfloat16), device_map="auto")`, no dtype argument (transformers 5: the checkpoint's
  bf16; the article's transformers 4 would have kept the non-quantized weights in fp32, which is slower);
* SFT: SFTTrainer on `### 指示\\n{text}\\n### 回答\\n{output}<eos>` strings, batch 1, gradient accumulation 4,
  max length 512, no packing, `paged_adamw_32bit`, no bf16/fp16 flags (set False explicitly: TRL 1.x would
  otherwise turn bf16 on), LoRA r=16 alpha=16 dropout 0.05 on q/k/v/o/gate/up/down; everything else TRL's
  defaults (gradient checkpointing included: TRL's default is on);
* DPO: DPOTrainer on prompt/chosen/rejected strings, batch 1, gradient accumulation 4, `adamw_8bit`, fp16,
  gradient checkpointing, a new LoRA r=8 (alpha 16, dropout 0.05) on q/v; the reference is the base model
  (adapter disabled). The model is loaded in fp16 (4-bit compute too), and the LoRA weights are kept in fp32 as the
  article's PEFT did (TRL 1.x would cast them to bf16, which fp16's gradient scaler rejects).

    python bench/seed.py sft MODEL_DIR DATA.jsonl OUT_DIR [--max-steps N]
    python bench/seed.py dpo MODEL_DIR PAIRS.csv OUT_DIR [--max-steps N]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

SFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(model_dir: str, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    kwargs = {"dtype": dtype} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, device_map="auto", **kwargs)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def sft_trainer(model_dir: str, records: list[dict], out_dir: str, *, max_steps: int = -1, callbacks=(), **overrides):
    """records: the seed's SFT format, {"text": instruction, "output": answer}."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(model_dir)
    texts = [f"### 指示\n{r['text']}\n### 回答\n{r['output']}{tokenizer.eos_token}" for r in records]
    dataset = Dataset.from_dict({"text": texts})
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules=SFT_MODULES)
    args = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        optim="paged_adamw_32bit",
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=2e-4,
        warmup_steps=10,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        fp16=False,
        max_length=512,
        packing=False,
        dataset_text_field="text",
        report_to="none",
        seed=42,
        **overrides,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=list(callbacks))


def dpo_trainer(model_dir: str, records: list[dict], out_dir: str, *, max_steps: int = -1, callbacks=(), **overrides):
    """records: {"prompt", "chosen", "rejected"} strings (the seed's header-less CSV)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_model(model_dir, torch.float16)  # fp16 training: the model and 4-bit compute in fp16
    rows = {"prompt": [f"### 指示\n{r['prompt']}\n### 回答\n" for r in records],
            "chosen": [r["chosen"] + tokenizer.eos_token for r in records],
            "rejected": [r["rejected"] + tokenizer.eos_token for r in records]}
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        optim="adamw_8bit",
        fp16=True,
        gradient_checkpointing=True,
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=5e-6,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        **overrides,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=list(callbacks))
    # TRL 1.x casts a quantized model's LoRA weights to bf16, which fp16's gradient scaler cannot unscale; the article's
    # stack kept them in fp32 (PEFT's default), the usual mixed-precision setup: do the same.
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["sft", "dpo"])
    p.add_argument("model_dir")
    p.add_argument("data")
    p.add_argument("out_dir")
    p.add_argument("--max-steps", type=int, default=-1)
    a = p.parse_args()
    if a.stage == "sft":
        records = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        trainer = sft_trainer(a.model_dir, records, a.out_dir, max_steps=a.max_steps)
    else:
        with open(a.data, newline="", encoding="utf-8") as f:
            records = [dict(zip(("prompt", "chosen", "rejected"), row)) for row in csv.reader(f)]
        trainer = dpo_trainer(a.model_dir, records, a.out_dir, max_steps=a.max_steps)
    result = trainer.train()
    print(json.dumps(result.metrics))
    trainer.save_model(a.out_dir)


if __name__ == "__main__":
    main()

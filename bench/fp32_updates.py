"""How much of a DPO step reaches the adapter: the job's fp32 LoRA weights against TRL's bf16 cast, side by side.

At DPO learning rates (docker/dpo.env: 5e-6) an AdamW update is ~lr per entry; a bf16 weight of magnitude ~1e-2 has a
spacing of ~6e-5, so most updates round away unless the trainable weights are kept in fp32. This trains the same
"SFT adapter" (non-zero A and B) on the same pairs for the same steps, once through the job's trainer (fp32 trainable
weights, bf16 compute) and once through TRL's own DPOTrainer (which casts QLoRA adapters to bf16), and counts the
entries of A and B that changed.

    python bench/fp32_updates.py --shape 1.8b --steps 10 --lr 5e-6 --out fp32.json      (one GPU, about 2 minutes)
    python bench/fp32_updates.py --shape tiny --device cpu                               (CPU smoke run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.8b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", default="/tmp/fp32-updates")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from trl import DPOTrainer

    import synth
    from job import sequences
    from job.model import load_adapter, load_base_model, load_tokenizer
    from job.settings import load_settings
    from job.stages import dpo
    from job.stages.common import training_args

    work = Path(a.work)
    model_dir = synth.build_model(work / f"model-{a.shape}", a.shape, device=a.device)
    env = {"JOB_STAGE": "dpo", "JOB_BASE_MODEL": str(model_dir), "JOB_DATA": str(work), "JOB_OUTPUT": str(work / "out"),
           "JOB_WORKDIR": str(work / "w"), "JOB_TRAIN__MAX_STEPS": str(a.steps), "JOB_TRAIN__LEARNING_RATE": str(a.lr),
           "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "4", "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "2",
           "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__MAX_LENGTH": "512", "JOB_TRAIN__WARMUP_RATIO": "0",
           "JOB_TRAIN__LR_SCHEDULER_TYPE": "constant", "JOB_TRAIN__GRADIENT_CHECKPOINTING": "true"}
    s = load_settings(env)
    tok, _ = load_tokenizer(model_dir, None, "auto")
    records = synth.dpo_records(a.pairs, vocab=1000 if a.shape == "tiny" else synth.VOCAB_SIZE)
    records = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    rows = sequences.fit(records, "dpo", tok, max_length=512, policy="cut_prompt", stops={tok.eos_token_id}, role="train").rows

    # An "SFT adapter": A and B both non-zero, of the magnitudes a trained adapter has.
    torch.manual_seed(0)
    base = load_base_model(model_dir, s)
    sft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p_ in sft.named_parameters():
            if "lora_B" in n:
                p_.mul_(0.01)
    sft.save_pretrained(work / "sft-adapter")
    del base, sft
    torch.cuda.empty_cache() if a.device == "cuda" else None

    def lora(model):
        return {n.replace(".default", ""): p_.detach().float().cpu().clone() for n, p_ in model.named_parameters()
                if ".default." in n and "lora_" in n}

    def changed(before, after):
        out = {}
        for kind in ("lora_A", "lora_B"):
            keys = [k for k in before if kind in k]
            total = sum(before[k].numel() for k in keys)
            moved = sum(int((before[k] != after[k]).sum()) for k in keys)
            out[kind] = round(moved / total, 4)
        return out

    from datasets import Dataset

    results = {"shape": a.shape, "steps": a.steps, "lr": a.lr, "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for name in ("job_fp32", "trl_bf16"):
        model = load_adapter(load_base_model(model_dir, s), work / "sft-adapter")
        start = lora(model)
        if name == "job_fp32":
            trainer = dpo.build_trainer(s, model, tok, rows, None, work / name, [], progress_bar=False)
        else:
            args = training_args(s, work / name, has_eval=False, progress_bar=False, model=model)

            class Plain(DPOTrainer):  # TRL as shipped, given the job's tokenized rows
                def _prepare_dataset(self, dataset, *args_, **kw):
                    return dataset

            trainer = Plain(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        dtypes = sorted({str(p_.dtype) for p_ in trainer.model.parameters() if p_.requires_grad})
        t0 = time.time()
        trainer.train()
        results[name] = {"trainable_dtype": dtypes, "changed_fraction": changed(start, lora(trainer.model)),
                         "seconds": round(time.time() - t0, 1)}
        print(name, results[name], flush=True)
        del trainer, model
        if a.device == "cuda":
            torch.cuda.empty_cache()
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

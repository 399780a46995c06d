"""`qlora-job demo [DIR]`: the whole product on a laptop CPU, no GPU, credentials or downloads.

It builds a tiny Llama-architecture model (random weights, a byte-level BPE tokenizer trained on the demo data),
then runs the real job twice through the same code path as production, 4-bit NF4 quantization included:
SFT on the built-in Japanese QA records, then DPO on the built-in preference pairs on top of the SFT adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path

log = logging.getLogger("job.demo")


def build_tiny_model(dest: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, vocab_size: int = 600, seed: int = 0,
                     extra_specials: list[str] = (), chat_template: str | None = None) -> Path:
    """A random-weight LlamaForCausalLM and its tokenizer, saved as safetensors in `dest` (no chat template unless
    given; `extra_specials` are added to the vocabulary as special tokens, e.g. ChatML's `<|im_end|>`)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_specials]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts + ["### 指示\n", "### 回答\n"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=list(extra_specials) or None)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest


def demo_texts(data_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows] + [r["output"] for r in rows] + (data_dir / "dpo.csv").read_text(encoding="utf-8").splitlines()


def run_demo(directory: str) -> int:
    from job.exitcodes import ExitCode
    from job.logs import use_json
    from job.pipeline import run
    from job.settings import load_settings

    root = Path(directory).resolve()
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sft.jsonl", "dpo.csv"):
        shutil.copyfile(resources.files("job") / "demo_data" / name, data_dir / name)
    model_dir = build_tiny_model(root / "tiny-llama", demo_texts(data_dir))
    log.info("demo: tiny model in %s", model_dir)
    common = {
        "JOB_BASE_MODEL": str(model_dir),
        "JOB_OUTPUT": str(root / "runs"),
        "JOB_WORKDIR": str(root / "work"),
        "JOB_LORA__R": "8",
        "JOB_LORA__ALPHA": "16",
        "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "4",
        "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "1",
        "JOB_TRAIN__LOGGING_STEPS": "5",
        "JOB_TRAIN__SAVE_STEPS": "0",
        "JOB_EVAL_MAX_NEW_TOKENS": "64",  # the demo's answers are shorter; the untrained model would ramble for 256
    }
    sft = load_settings({**common, "JOB_STAGE": "sft", "JOB_DATA": str(data_dir / "sft.jsonl"), "JOB_RUN_ID": "demo-sft",
                         "JOB_EVAL_FRACTION": "0.125", "JOB_TRAIN__NUM_TRAIN_EPOCHS": "15", "JOB_TRAIN__LEARNING_RATE": "3e-3",
                         "JOB_TRAIN__MAX_LENGTH": "128"})
    for old in ("demo-sft", "demo-dpo"):
        shutil.rmtree(root / "runs" / old, ignore_errors=True)  # the demo always trains afresh
    bar = not use_json("auto")  # a progress bar on a terminal, JSON lines otherwise, as in a real run
    sft_out = run(sft, progress_bar=bar)
    dpo = load_settings({**common, "JOB_STAGE": "dpo", "JOB_DATA": str(data_dir / "dpo.csv"), "JOB_RUN_ID": "demo-dpo",
                         "JOB_ADAPTER": str(Path(sft_out) / "adapter"), "JOB_TRAIN__NUM_TRAIN_EPOCHS": "3",
                         "JOB_TRAIN__LEARNING_RATE": "1e-3", "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2"})
    dpo_out = run(dpo, progress_bar=bar)
    lines = ["", "qlora-job demo finished.", ""]
    for name, out in (("SFT", sft_out), ("DPO", dpo_out)):
        m = json.loads((Path(out) / "metrics.json").read_text())
        first = next(json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l)
        extra = f", mean reward accuracy {m['reward_accuracy']:.2f}" if name == "DPO" else f", eval loss {m['eval_loss']:.3f}"
        lines.append(f"  {name}: {m['steps']} steps, loss {first['loss']:.3f} -> {m['train_loss_last']:.3f}{extra}, {m['train_runtime_s']:.0f}s")
        lines.append(f"       {out}/  (adapter/, generations.md, loss.png, metrics.json, metrics.jsonl, run.json, _SUCCESS)")
    lines += ["", "Load the DPO adapter:", f"  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), '{dpo_out}/adapter')", ""]
    print("\n".join(lines))
    return ExitCode.OK

"""`qlora-job demo [DIR]`: the whole product on a laptop CPU, no GPU, credentials or downloads, in a couple of minutes.

It builds a tiny Llama-architecture model (random weights, a byte-level BPE tokenizer trained on the demo data),
then runs the real job twice through the same code path as production, 4-bit NF4 quantization included:

1. SFT on 32 made-up facts (`暗号 N8B6 が表す言葉は？` -> an invented word, `ルリマ`), which no model can know before
   it is trained on them; about a third of the answers add a polite `です。`, as real data is rarely consistent.
2. DPO on top of the SFT adapter, with pairs that prefer one style: the chosen answer ends with `です。`, the
   rejected one is the bare word.

The closing summary shows the answers before and after each stage and the share that matches the data exactly.
The recipe (model shape, full-batch steps, learning rates) is tests/test_learning.py's, measured in
bench/learn/README.md; tests/test_learning.py runs this demo too.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path

log = logging.getLogger("job.demo")


def build_tiny_model(dest: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, vocab_size: int = 600, seed: int = 0,
                     extra_specials: list[str] = (), chat_template: str | None = None,
                     initializer_range: float = 0.02) -> Path:
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
        initializer_range=initializer_range,
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest


def demo_texts(data_dir: Path) -> list[str]:
    """The corpus of the tests' tiny model (conftest's `tiny_model`): sft.jsonl and dpo.csv, the Japanese QA records."""
    rows = [json.loads(line) for line in (data_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows] + [r["output"] for r in rows] + (data_dir / "dpo.csv").read_text(encoding="utf-8").splitlines()


#: The demo's files in job/demo_data (sft.jsonl and dpo.csv there are the tests' everyday data).
SFT_FILE, DPO_FILE = "facts_sft.jsonl", "facts_dpo.jsonl"
#: tests/test_learning.py's model: two layers of 128. The frozen LM head and final norm bound the logits by
#: |row| x |hidden| = (0.125 x sqrt(128)) x sqrt(128) = 16; at the usual 0.02 init they'd stay within +-2.6, and no
#: answer could become confident.
SHAPE = dict(hidden=128, layers=2, vocab_size=1000, initializer_range=0.125)
#: Full-batch steps (every fact in one step, so a step is an epoch), tests/test_learning.py's recipe: SFT answers every
#: fact right from about step 20 of 40 (bench/learn/README.md). DPO, measured on this data: 97% of the answers in the
#: chosen style after 10 steps, every held-out pair ranked right; 1e-3 to 3e-3 gave 72-91% with a tokenizer that
#: merged the word with です (facts_texts says why it no longer does).
COMMON = {
    "JOB_LORA__R": "16",
    "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "32",
    "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "1",
    "JOB_TRAIN__PACKING": "false",
    "JOB_TRAIN__LOGGING_STEPS": "10",
    "JOB_TRAIN__SAVE_STEPS": "0",
    "JOB_EVAL_MAX_NEW_TOKENS": "12",  # the answers are a few tokens; the untrained model would ramble for 256
}
SFT = {"JOB_TRAIN__NUM_TRAIN_EPOCHS": "40", "JOB_TRAIN__LEARNING_RATE": "1e-2"}
DPO = {"JOB_TRAIN__NUM_TRAIN_EPOCHS": "10", "JOB_TRAIN__LEARNING_RATE": "2e-3", "JOB_EVAL_FRACTION": "0.25"}


def facts_texts(data_dir: Path) -> list[str]:
    """What the demo's tokenizer is trained on: every prompt, every word, and `です。` on its own. Never the word and
    `です` together: BPE would merge across the boundary (`サです` as one token), and then the bare word and the
    polite answer would differ in the word's last token, which DPO pushes down with the rejected answer (`ケカサ` ->
    `ケカです。`)."""
    rows = [json.loads(line) for line in (data_dir / DPO_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in rows] + [r["rejected"] for r in rows] + ["です。"] * len(rows)


def demo_settings(root: Path) -> tuple[dict, dict]:
    """The environments of the demo's two runs (the DPO one's JOB_ADAPTER is the SFT run's adapter)."""
    data_dir, model_dir = root / "data", root / "tiny-llama"
    common = {**COMMON, "JOB_BASE_MODEL": str(model_dir), "JOB_OUTPUT": str(root / "runs"), "JOB_WORKDIR": str(root / "work")}
    # The prompts answered before and after: every fact, whose references are the SFT answers, then the chosen ones.
    sft = {**common, **SFT, "JOB_STAGE": "sft", "JOB_DATA": str(data_dir / SFT_FILE), "JOB_EVAL_PROMPTS": str(data_dir / SFT_FILE),
           "JOB_RUN_ID": "demo-sft"}
    dpo = {**common, **DPO, "JOB_STAGE": "dpo", "JOB_DATA": str(data_dir / DPO_FILE), "JOB_EVAL_PROMPTS": str(data_dir / DPO_FILE),
           "JOB_RUN_ID": "demo-dpo", "JOB_ADAPTER": str(root / "runs" / "demo-sft" / "adapter")}
    return sft, dpo


def run_demo(directory: str) -> int:
    import torch

    from job.exitcodes import ExitCode
    from job.logs import use_json
    from job.pipeline import run
    from job.settings import load_settings

    root = Path(directory).resolve()
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in (SFT_FILE, DPO_FILE):
        shutil.copyfile(resources.files("job") / "demo_data" / name, data_dir / name)
    model_dir = build_tiny_model(root / "tiny-llama", facts_texts(data_dir), **SHAPE)
    log.info("demo: tiny model in %s", model_dir)
    # One thread: a model this small gains nothing from more, and on a busy machine OpenMP's spinning threads cost
    # several times the CPU time per step (tests/test_learning.py).
    torch.set_num_threads(1)
    for old in ("demo-sft", "demo-dpo"):
        shutil.rmtree(root / "runs" / old, ignore_errors=True)  # the demo always trains afresh
    bar = not use_json("auto")  # a progress bar on a terminal, JSON lines otherwise, as in a real run
    sft_env, dpo_env = demo_settings(root)
    sft_out = run(load_settings(sft_env), progress_bar=bar)
    dpo_out = run(load_settings(dpo_env), progress_bar=bar)
    print(closing_summary(Path(sft_out), Path(dpo_out), model_dir), flush=True)
    return ExitCode.OK


def closing_summary(sft_out: Path, dpo_out: Path, model_dir: Path, pairs: int = 3) -> str:
    """What the demo taught, from the files the runs wrote: exact-match figures, a few before/after answers, where
    everything is."""
    lines = ["", "qlora-job demo finished.", ""]
    for name, out, what in (("SFT", sft_out, "the made-up fact's word, as in the data"),
                            ("DPO", dpo_out, "the word in the preferred polite style, 〜です。")):
        m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        gens = [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
        start = "the random base model" if name == "SFT" else "base + the SFT adapter"
        lines.append(f"{name}: {m['steps']} steps in {m['train_runtime_s']:.0f}s. Answers that are exactly {what}: "
                     f"{m['generation_exact_match_before']:.0%} before ({start}) -> {m['generation_exact_match_after']:.0%} after"
                     + (f"; held-out pairs ranked right: {m['eval_reward_accuracy']:.0%}" if m.get("eval_reward_accuracy") is not None else ""))
        # For DPO, show the prompts whose answers changed style (the SFT adapter already said the others politely).
        shown = [g for g in gens if g["before"] != g["after"]] if name == "DPO" else gens
        for g in (shown or gens)[:pairs]:
            lines.append(f"  {g['prompt']}  before: {g['before']!r}  after: {g['after']!r}  (data: {g['reference']!r})")
        lines += [f"  files: {out}/ (adapter/, generations.md: every answer; loss.png, metrics.json, run.json)", ""]
    lines += ["Load the DPO adapter:",
              f"  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), '{dpo_out}/adapter')", ""]
    return "\n".join(lines)

"""Made-up facts for learnability checks: codes that name invented words (`N8B6` -> `pomini`), which no model can know
before it is trained on them. Also a random-weight Llama of a given shape with a tokenizer trained on them.

SFT records answer with the word, with a closing period in about half of them (data is rarely consistent);
DPO pairs then prefer one style: the chosen answer ends with a period, the rejected one does not. So SFT teaches
the content, and DPO a rule that SFT left open, as in the usual SFT-then-DPO recipe.

    >>> facts = make_facts(200)
    >>> sft_records(facts)[0], dpo_records(facts)[0]
    ({'prompt': 'What is the word for code N8B6?', 'completion': 'pomini'},
     {'prompt': 'What is the word for code N8B6?', 'chosen': 'pomini.', 'rejected': 'pomini'})
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
#: The DPO rule: a chosen answer ends with this, the rejected one does not.
RULE_SUFFIX = "."


def make_facts(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct (code, word) facts: codes letter-digit-letter-digit, words of three consonant-vowel syllables; `period`:
    whether the SFT answer ends with one."""
    rng = random.Random(seed)
    codes, words = set(), set()
    out = []
    while len(out) < n:
        code = "".join(rng.choice(s) for s in ("ABCDEFGHJKLMNPQRSTUVWXYZ", "23456789", "ABCDEFGHJKLMNPQRSTUVWXYZ", "23456789"))
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(3))
        if code in codes or word in words:
            continue
        codes.add(code)
        words.add(word)
        out.append({"code": code, "word": word, "period": rng.random() < 0.5})
    return out


def prompt(fact: dict) -> str:
    return f"What is the word for code {fact['code']}?"


def sft_records(facts: list[dict]) -> list[dict]:
    return [{"prompt": prompt(f), "completion": f["word"] + (RULE_SUFFIX if f["period"] else "")} for f in facts]


def dpo_records(facts: list[dict]) -> list[dict]:
    return [{"prompt": prompt(f), "chosen": f["word"] + RULE_SUFFIX, "rejected": f["word"]} for f in facts]


def texts(facts: list[dict]) -> list[str]:
    """What the tokenizer is trained on: every prompt and both answer styles."""
    return [prompt(f) for f in facts] + [f["word"] for f in facts] + [f["word"] + RULE_SUFFIX for f in facts]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_tokenizer(dest: Path, corpus: list[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on `corpus` (plus the job's instruction format), saved in `dest`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus + ["### 指示\n", "### 回答\n"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    return tok


def build_model(dest: Path, corpus: list[str], shape: dict, *, vocab_size: int | None = None, device: str = "cpu",
                dtype: str = "float32", seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM of `shape` (hidden_size, intermediate_size, num_hidden_layers, heads...) with
    the tokenizer above, as safetensors in `dest`. `vocab_size` pads the embedding to a real model's size (llm-jp-3:
    99,584); the tokenizer uses its first rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(dest, corpus)
    config = LlamaConfig(vocab_size=max(vocab_size or 0, len(tok)), max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, dtype=dtype, **shape)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    return dest

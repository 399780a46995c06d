"""Synthetic inputs for the benchmark and the GPU tests: a word-level tokenizer with llm-jp-3's vocabulary size,
random-weight Llama models with llm-jp-3's shapes, and seeded instruction/preference data whose token lengths follow
real instruction sets (lognormal, median ~330 tokens per example, a long tail to 1-2k).

Every synthetic word `w123` is exactly one token, so the lengths drawn here are the lengths the trainer sees
(plus the prompt format's few tokens: `<s> ### 指示 ... ### 回答 ... </s>` = 6).
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

VOCAB_SIZE = 99_584  # llm-jp-3's
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
FORMAT_WORDS = ["###", "指示", "回答"]
#: Tokens the job's instruction format adds around prompt and answer: <s> ### 指示 \n ... ### 回答 \n ... </s>
FORMAT_TOKENS = 6

#: llm-jp-3 shapes (config.json of llm-jp/llm-jp-3-13b and -1.8b): hidden, intermediate, layers, heads, kv heads.
SHAPES = {
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "1.8b": dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    # CPU smoke test of the benchmark script only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}


def matmul_params(shape: str, vocab: int = VOCAB_SIZE) -> int:
    """N in the FLOP formula: parameters of every matrix multiply per token (decoder projections + LM head)."""
    s = SHAPES[shape]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    return layers * per_layer + h * vocab


def build_tokenizer(dest: Path, vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer: specials, the prompt format's words, then `w0`, `w1`, ... up to `vocab_size` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + FORMAT_WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    return tok


def build_model(dest: Path, shape: str, *, device: str = "cuda", seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM of the given shape in bf16 (built on `device`), saved as safetensors with
    the word-level tokenizer. Skipped when `dest` already holds one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
        return dest
    tok = build_tokenizer(dest, VOCAB_SIZE if shape != "tiny" else 1000)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(math.exp(rng.gauss(math.log(median), sigma)))))


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(vocab - 16)}" for _ in range(n))


def sft_records(n: int = 1729, *, seed: int = 0, median: float = 320, sigma: float = 0.75, max_tokens: int = 2048,
                vocab: int = VOCAB_SIZE) -> list[dict]:
    """The seed's record format (ichikara-instruction: `text` = instruction, `output` = answer). The whole example's
    length (format tokens included) is lognormal: median `median`, 99th percentile ~5.7x the median, capped."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = _lognormal_int(rng, median, sigma, 24, max_tokens) - FORMAT_TOKENS
        prompt = max(4, round(total * rng.uniform(0.15, 0.5)))
        out.append({"text": _words(rng, prompt, vocab), "output": _words(rng, total - prompt, vocab)})
    return out


def dpo_records(n: int = 97, *, seed: int = 1, vocab: int = VOCAB_SIZE) -> list[dict]:
    """Preference pairs: prompt median ~100 tokens, each answer median ~200 (lognormal), like hand-labelled QA pairs."""
    rng = random.Random(seed)
    return [
        {"prompt": _words(rng, _lognormal_int(rng, 100, 0.6, 8, 512), vocab),
         "chosen": _words(rng, _lognormal_int(rng, 200, 0.6, 8, 800), vocab),
         "rejected": _words(rng, _lognormal_int(rng, 200, 0.6, 8, 800), vocab)}
        for _ in range(n)
    ]


def write_sft(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_dpo(path: Path, records: list[dict]) -> Path:
    """The seed's preference file: header-less CSV, prompt,chosen,rejected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for r in records:
            w.writerow([r["prompt"], r["chosen"], r["rejected"]])
    return path


def length_stats(lengths: list[int]) -> dict:
    xs = sorted(lengths)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"n": len(xs), "total": sum(xs), "mean": round(sum(xs) / len(xs), 1), "median": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": xs[-1], "over_512": sum(x > 512 for x in xs), "over_1024": sum(x > 1024 for x in xs)}

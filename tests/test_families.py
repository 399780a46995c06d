"""Model families beyond Llama: each trains correctly with the job's fast paths, or is refused before any download.

For each family a tiny random-weight model is built from its config (with a sliding window of 8 tokens where the
family has windows, shorter than most examples, so that a window that is ignored shows), loaded the way the job loads
it (job/model.py, attention as job/fastpaths.py decides) in fp32 without quantization, and:

* SFT: a packed row as TRL's collator builds it for the job gives every example the log-probabilities of that example
  run alone;
* DPO: the padding-free flat row (job/padfree.py, where the fast-path table turns it on) gives every row's
  log-probabilities as TRL's padded batch does.

Controls: with the window dropped from the packed path (what job/attention.py did before), the windowed families'
packed rows differ from the separate ones by far more than the tolerance.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import DEMO_DATA, at_precision, job_env, run_job, tokenized
from job import attention, data, padfree
from job.exitcodes import ExitCode
from job.settings import ColumnSettings

WINDOW = 8
CUDA = torch.cuda.is_available()
#: Largest per-token difference of log-probabilities. fp32 without quantization: equal up to summation order (measured
#: ~1e-6 on the CPU). On a CUDA GPU also the job's defaults, NF4 with bf16 compute, through the varlen flash kernel
#: (within bf16 rounding, as tests/test_packing.py and tests/test_padfree.py allow).
TOL = {"fp32": 1e-4, "nf4-bf16": 3e-2}
PRECISIONS = ["fp32", "nf4-bf16"] if CUDA else ["fp32"]

#: model_type -> config overrides on top of the shared tiny shape; windowed families get an 8-token window.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},  # layer 0 full, layer 1 windowed
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "head_dim": 16},
    "gemma2": {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0,
               "final_logit_softcapping": 30.0},
    "phi3": {"sliding_window": WINDOW},
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},
}
WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "phi3")


def build_family_model(tiny_model, dest, model_type: str, **overrides):
    """A random-weight model of `model_type` with the tiny Llama's tokenizer, saved as safetensors in `dest`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dest / f.name)
    tok = AutoTokenizer.from_pretrained(dest)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if model_type == "gpt_neox":
        shape.pop("num_key_value_heads")
    config = AutoConfig.for_model(model_type, **{**shape, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_model, tmp_path_factory):
    return request.param, build_family_model(tiny_model, tmp_path_factory.mktemp(request.param), request.param,
                                             **FAMILIES[request.param])


def _sft_records():
    rows = data.load_records(DEMO_DATA / "sft.jsonl", "sft.jsonl", "sft", ColumnSettings())
    return rows[:12]


def _logps(model, input_ids, **kw):
    with torch.no_grad():
        logits = model(input_ids=input_ids, **kw).logits.float()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, input_ids[0, 1:, None])[:, 0]


def _packed_vs_alone(trainer):
    """Per example of the first packed row: the largest difference of its tokens' log-probabilities between the
    packed forward and the example alone."""
    model = trainer.model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(trainer.get_train_dataloader())).items()}
    ids, pos = batch["input_ids"][:1], batch["position_ids"][:1]
    extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    packed = _logps(model, ids, position_ids=pos, **extra)
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    diffs = []
    for a, b in zip(starts, starts[1:] + [pos.shape[1]]):
        alone = _logps(model, ids[:, a:b])
        diffs.append((packed[a:b - 1] - alone).abs().max().item())
    assert len(diffs) >= 2, "the row must hold several examples"
    assert max(b - a for a, b in zip(starts, starts[1:] + [pos.shape[1]])) > WINDOW, "examples longer than the window"
    return diffs


def _randomize_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_sft_rows_equal_each_example_alone(family, precision, tmp_path):
    from job.stages import sft

    name, model_dir = family
    s, tok, model = at_precision(model_dir, tmp_path, "sft", precision, JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="4",
                                 JOB_TRAIN__MAX_LENGTH="256")
    trainer = sft.build_trainer(s, model, tok, tokenized(tok, "sft", _sft_records(), 256), None, tmp_path / "ck", [],
                                progress_bar=False)
    report = trainer.job_fast_paths.report()
    assert report["packed_attention"]["on"] == (name != "gemma2"), report
    if CUDA and name != "gemma2":
        assert "variable-length flash kernel" in report["packed_attention"]["why"], report
    _randomize_lora(trainer.model)
    diffs = _packed_vs_alone(trainer)
    print(name, precision, trainer.model.config._attn_implementation, f"worst {max(diffs):.2e}")
    assert max(diffs) <= TOL[precision], (name, diffs)


@pytest.mark.parametrize("name", ["mistral", "phi3", "qwen2"])
def test_control_a_window_left_out_of_packed_rows_changes_the_losses(name, tiny_model, tmp_path, monkeypatch):
    from job.stages import sft

    model_dir = build_family_model(tiny_model, tmp_path / name, name, **FAMILIES[name])
    s, tok, model = at_precision(model_dir, tmp_path, "sft", "fp32", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="4",
                                 JOB_TRAIN__MAX_LENGTH="256")
    trainer = sft.build_trainer(s, model, tok, tokenized(tok, "sft", _sft_records(), 256), None, tmp_path / "ck", [],
                                progress_bar=False)
    _randomize_lora(trainer.model)
    monkeypatch.setattr(attention, "window", lambda module, kwargs: None)  # the window ignored, as before the fix
    assert max(_packed_vs_alone(trainer)) > 100 * TOL["fp32"]


def _pairs():
    pairs = data.load_records(DEMO_DATA / "dpo.csv", "dpo.csv", "dpo", ColumnSettings())[:6]
    for i, p in enumerate(pairs[:3]):  # rows of very different lengths in one micro-batch: real padding
        long = dict(p)
        long["chosen"] = [{"role": "assistant", "content": p["chosen"][0]["content"] * (3 + i)}]
        pairs.append(long)
    return pairs


@pytest.mark.parametrize("precision", PRECISIONS)
def test_padding_free_dpo_rows_equal_padded_rows(family, precision, tmp_path):
    from job.stages import dpo

    name, model_dir = family
    s, tok, model = at_precision(model_dir, tmp_path, "dpo", precision, JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="4",
                                 JOB_TRAIN__MAX_LENGTH="192", JOB_LORA__DROPOUT="0")
    trainer = dpo.build_trainer(s, model, tok, tokenized(tok, "dpo", _pairs(), 192), None, tmp_path / "ck", [],
                                progress_bar=False)
    assert trainer.job_padding_free == (name != "gemma2"), trainer.job_fast_paths.report()
    _randomize_lora(trainer.model)
    trainer.model.eval()
    batch = max((trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()),
                key=lambda b: (b["attention_mask"] == 0).sum().item())

    def row_logps(b):
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        kw = {k: v for k, v in b.items() if k != "completion_mask"}
        with torch.no_grad(), trainer.compute_loss_context_manager():
            out = trainer.model(**kw, labels=labels, fused_lm_head=True, use_cache=False)
        return out.log_probs.float()

    flat = row_logps(batch)
    padded = row_logps({k: v for k, v in batch.items() if k != padfree.KEY})
    worst = (flat - padded).abs().max().item()
    print(name, precision, f"padding-free {trainer.job_padding_free}: worst per-token difference {worst:.2e}")
    assert worst <= TOL[precision]


@pytest.mark.parametrize("model_type,overrides", [("bloom", {"n_layer": 2, "n_head": 4, "hidden_size": 64}),
                                                  ("falcon", {"num_hidden_layers": 2, "num_attention_heads": 4,
                                                              "hidden_size": 64, "alibi": True})])
def test_attention_in_its_own_code_is_refused_for_packed_sft_before_the_weights_and_trains_padded(
        model_type, overrides, tiny_model, tmp_path):
    """Bloom and Falcon compute attention in their own code: packed rows are refused at --check (exit 4, naming the
    architecture and the setting), no traceback; with JOB_TRAIN__PACKING=false the model is causal (appending tokens
    leaves the earlier logits as they were) and a short SFT run succeeds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from job.model import load_base_model
    from job.settings import load_settings

    dest = tmp_path / model_type
    dest.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dest / f.name)
    tok = AutoTokenizer.from_pretrained(dest)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest, safe_serialization=True)

    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(dest), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                  JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"))
    r = run_job(env, "--check")  # what a run checks before the weights download: the config is enough
    assert r.returncode == ExitCode.MODEL, r.stderr[-2000:]
    arch = type(AutoModelForCausalLM.from_config(config)).__name__
    assert arch in r.stderr and "JOB_TRAIN__PACKING=false" in r.stderr and "Traceback" not in r.stderr

    s = load_settings({**{k: v for k, v in env.items() if k.startswith("JOB_")}, "JOB_TRAIN__PACKING": "false",
                       "JOB_QUANT__LOAD_IN": "none", "JOB_QUANT__COMPUTE_DTYPE": "float32"})
    model = load_base_model(dest, s).eval()
    ids = torch.randint(5, len(tok) - 1, (1, 24), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        short, longer = model(input_ids=ids[:, :16]).logits, model(input_ids=ids).logits[:, :16]
    assert (short - longer).abs().max().item() < 1e-4  # no attention to later tokens

    r = run_job({**env, "JOB_TRAIN__PACKING": "false", "JOB_TRAIN__MAX_STEPS": "2", "JOB_TRAIN__SAVE_STEPS": "0",
                 "JOB_TRAIN__MAX_LENGTH": "128", "JOB_EVAL_PROMPTS": "none", "JOB_RUN_ID": "padded"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "padded" / "_SUCCESS").exists()

"""job/decode.py's greedy answers (a static KV cache; on a GPU, a CUDA graph replayed for each token) are transformers'
`generate` answers, token for token, for left-padded batches, with or without an adapter; they stop when every row
has ended or the time is up; models the path does not cover get `generate`. Its speed is measured on the GPU
(docs/benchmarks.md, lever 13)."""

from __future__ import annotations

import logging
import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPTS = [[5, 17, 33, 8, 91, 120, 7, 64, 250, 11, 9], [40, 41, 42], [300, 2, 77, 19, 5, 6]]  # 11, 3 and 6 tokens


def _batch(tok, prompts, device="cpu"):
    return tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)


def _generate(model, batch, n):
    """transformers' greedy answers, never stopping early: the reference."""
    out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                         pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:]


def _greedy(model, batch, n, **kw):
    import torch

    from job.decode import greedy

    with torch.no_grad():
        return greedy(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=n, eos=kw.pop("eos", [-1]),
                      deadline=kw.pop("deadline", time.monotonic() + 60), **kw)


@pytest.fixture(scope="module")
def models(tiny_model):
    """The tiny Llama in fp32, alone and under a LoRA adapter whose B is not zero (so the adapter changes answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.model import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                             LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)).eval()
    return base, adapted, load_tokenizer(tiny_model, None, "auto")[0]


def test_greedy_answers_are_generates_for_a_left_padded_batch_with_and_without_an_adapter(models):
    import torch

    from job.decode import unsupported

    base, adapted, tok = models
    batch = _batch(tok, PROMPTS)
    assert batch["attention_mask"][1].tolist() == [0] * 8 + [1] * 3  # left padding, 8 positions of it
    with torch.no_grad():
        for model in (base, adapted):
            assert unsupported(model) is None
            want = _generate(model, batch, 20)
            got = _greedy(model, batch, 20)
            assert got.shape == (3, 20) and torch.equal(got, want)
        assert not torch.equal(_greedy(base, batch, 20), _greedy(adapted, batch, 20))  # the adapter is in the answers
        # The control: the padding read as prompt tokens (what ignoring the left padding would do) answers otherwise,
        # so the comparison above can fail.
        padded_as_text = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
        assert not torch.equal(_greedy(base, padded_as_text, 20), _generate(base, batch, 20))


def test_answers_stop_once_every_row_has_said_eos_and_when_time_is_up(models):
    import torch

    from job import decode

    base, _, tok = models
    batch = _batch(tok, PROMPTS)
    full = _greedy(base, batch, 64)
    assert full.shape[1] == 64
    # an id each row has produced by its 10th token: the loop stops at the next check, keeping the rows identical
    eos = sorted({int(row[:10][-1]) for row in full})
    stopped = _greedy(base, batch, 64, eos=eos)
    assert stopped.shape[1] == decode.CHECK_EVERY and torch.equal(stopped, full[:, :decode.CHECK_EVERY])
    late = _greedy(base, batch, 64, deadline=time.monotonic() - 1)
    assert late.shape[1] == decode.CHECK_EVERY and torch.equal(late, full[:, :decode.CHECK_EVERY])


def test_models_the_static_cache_does_not_cover_are_answered_by_generate(models, caplog):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from job import decode, evaluate

    tok = models[2]
    caplog.set_level(logging.INFO, logger="job")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)).eval()
    assert "sliding_attention" in decode.unsupported(model)
    prompts = [evaluate.Prompt([{"role": "user", "content": q}]) for q in ("東京は?", "富士山の高さは?")]
    got = evaluate.generate(model, tok, prompts, max_new_tokens=5, batch_tokens=4096)
    assert any("transformers' generate" in r.getMessage() and "sliding_attention" in r.getMessage() for r in caplog.records)
    assert all(g["text"] is not None and g["new_tokens"] >= 1 for g in got)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="CUDA graphs need a GPU")
def test_on_a_gpu_the_replayed_graph_answers_like_the_eager_loop(tiny_model, monkeypatch):
    """The job's "after" generations on a GPU: 4-bit base, LoRA adapter, bf16, the kept dequantized copy, Liger's
    Triton kernels where installed (applied by the trainer before training). The graph is captured once and replayed
    (counted), its tokens are the eager loop's, and each is the model's own greedy choice when the whole answer is
    read again in one pass (within bf16 rounding: generate's growing cache rounds differently from either)."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from job import decode
    from job.model import keep_dequantized, load_tokenizer, quantization_config
    from job.settings import QuantSettings

    m = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(QuantSettings()),
                                             dtype=torch.bfloat16, device_map={"": "cuda"})
    torch.manual_seed(0)
    model = get_peft_model(m, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    keep_dequantized(model)
    if importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches the module too: undo after
            monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
        _apply_liger_kernel_to_instance(model=model.get_base_model(), fused_linear_cross_entropy=False)
    tok = load_tokenizer(tiny_model, None, "auto")[0]
    batch = _batch(tok, PROMPTS, "cuda")
    captured = []
    real_capture = decode._capture
    monkeypatch.setattr(decode, "_capture", lambda *a: captured.append(real_capture(*a)) or captured[-1])
    with torch.no_grad():
        eager = _greedy(model, batch, 40, graph=False)
        assert not captured
        replayed = _greedy(model, batch, 40)
        assert len(captured) == 1 and captured[0] is not None  # captured, not fallen back to eager
        assert torch.equal(replayed, eager)
        ids = torch.cat([batch["input_ids"], replayed], 1)
        logits = model(input_ids=ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(replayed)], 1)
                       ).logits[:, batch["input_ids"].shape[1] - 1:-1].float()
    chosen = logits.gather(-1, replayed[..., None])[..., 0]
    gap = logits.max(-1).values - chosen
    assert gap.max().item() <= 0.05 * logits.abs().max().item(), gap
    # the control: a token that is not the greedy choice has a gap far above that
    other = (replayed + 1) % logits.shape[-1]
    assert (logits.max(-1).values - logits.gather(-1, other[..., None])[..., 0]).mean().item() > 0.05 * logits.abs().max().item()

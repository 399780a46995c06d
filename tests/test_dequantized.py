"""JOB_QUANT__KEEP_DEQUANTIZED: one copy of the 4-bit base dequantized once (job/model.py) computes what bitsandbytes
computes on every call, trains the same adapter, is never saved, is chosen by `auto` only where memory allows, and is
the first thing dropped when a run runs out of GPU memory. The speed it buys is measured on the GPU
(docs/benchmarks.md, levers 4 and 4b)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import four_bit_lora_model, plan_as_on_a_big_gpu, run_sft_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_kept_copy_gives_bitsandbytes_logits_and_gradients_without_calling_it(tiny_model, monkeypatch):
    """Exactly equal logits and LoRA gradients, and bitsandbytes' 4-bit matmul is not called once the copy is kept
    (the control: without the copy, the same patched model fails at its first layer)."""
    import bitsandbytes as bnb
    import torch

    from job.model import dequantized_bytes, four_bit_layers, keep_dequantized

    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(1))

    def run(m):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}

    base, fast = four_bit_lora_model(tiny_model), four_bit_lora_model(tiny_model)
    expected = dequantized_bytes(fast)
    assert expected == sum(layer.weight.quant_state.shape.numel() * 2 for layer in four_bit_layers(fast)) > 0
    assert keep_dequantized(fast) == expected
    assert keep_dequantized(fast) == 0  # once
    la, ga = run(base)

    def no_dequantize(*a, **kw):
        raise AssertionError("bitsandbytes' 4-bit matmul was called")

    monkeypatch.setattr(bnb, "matmul_4bit", no_dequantize)  # what Linear4bit.forward calls
    with pytest.raises(AssertionError, match="4-bit matmul was called"):
        run(base)
    lb, gb = run(fast)
    torch.testing.assert_close(lb, la, atol=0, rtol=0)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=0, rtol=0)
    assert not any("_dequantized" in k for k in fast.state_dict())


def test_a_run_with_the_copy_trains_the_same_adapter_and_says_so(tiny_model, tmp_path):
    from safetensors.torch import load_file

    with_copy = run_sft_in_process(tiny_model, tmp_path, "copy", JOB_QUANT__KEEP_DEQUANTIZED="true")
    without = run_sft_in_process(tiny_model, tmp_path, "plain", JOB_QUANT__KEEP_DEQUANTIZED="false")
    import torch

    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (with_copy, without))
    assert a.keys() == b.keys() and not any("dequantized" in k for k in a)
    # Bit for bit on the CPU. On CUDA the tiny model's micro-batches are small enough for bitsandbytes' fused 4-bit
    # kernel, which rounds differently from the dequantized product (job/model.py): equal within bf16 rounding.
    exact = not torch.cuda.is_available()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **({"atol": 0, "rtol": 0} if exact else {"atol": 1e-4, "rtol": 1e-2}), msg=k)
    m_copy, m_plain = (json.loads((d / "metrics.json").read_text()) for d in (with_copy, without))
    assert m_copy["dequantized_copy_gib"] is not None and m_plain["dequantized_copy_gib"] is None  # (the tiny copy rounds to 0.0)
    if exact:
        assert m_copy["train_loss"] == m_plain["train_loss"]


def test_a_copy_of_weights_that_are_not_4bit_is_a_config_error_naming_the_variables():
    from job.errors import ConfigError
    from job.settings import load_settings

    with pytest.raises(ConfigError) as e:
        load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o",
                       "JOB_QUANT__LOAD_IN": "8bit", "JOB_QUANT__KEEP_DEQUANTIZED": "true"})
    assert "JOB_QUANT__KEEP_DEQUANTIZED" in str(e.value) and "JOB_QUANT__LOAD_IN=8bit" in str(e.value)


def test_out_of_memory_drops_the_copy_first_then_turns_checkpointing_on(tiny_model, tmp_path, monkeypatch, caplog):
    """`auto` guessed that both the copy and the activations fit; the GPU said otherwise twice: the run drops the copy,
    then turns checkpointing on, and succeeds. A copy the user asked for is not dropped: exit 5 names the setting."""
    import torch
    from trl import SFTTrainer

    from job.errors import OutOfMemory

    # What `auto` decides on a big GPU: checkpointing off, the copy kept, the micro-batch as set (on a GPU `auto` may
    # also merge the tiny model's steps, and give that back first: tests/test_micro_batches.py).
    plan_as_on_a_big_gpu(monkeypatch, copy=True)
    real_step = SFTTrainer.training_step
    seen = []

    def step(self, *a, **kw):  # fits only without the copy and with checkpointing
        seen.append((self.job_dequantized_gib is not None, bool(self.args.activation_checkpointing)))
        if self.job_dequantized_gib is not None or not self.args.activation_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "training_step", step)
    out = run_sft_in_process(tiny_model, tmp_path, "auto")
    assert (out / "_SUCCESS").exists()
    assert seen[:3] == [(True, False), (False, False), (False, True)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("starting again without the copy" in m for m in messages)
    assert any("starting again with it on" in m for m in messages)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dequantized_copy_gib"] is None and metrics["gradient_checkpointing"] is True

    with pytest.raises(OutOfMemory) as e:
        run_sft_in_process(tiny_model, tmp_path, "asked", JOB_QUANT__KEEP_DEQUANTIZED="true", JOB_TRAIN__GRADIENT_CHECKPOINTING="true")
    assert "JOB_QUANT__KEEP_DEQUANTIZED=false" in str(e.value) and not (tmp_path / "out" / "asked" / "_SUCCESS").exists()


def test_a_dropped_copy_gives_the_layers_back_to_bitsandbytes(tiny_model, monkeypatch):
    """drop_dequantized (used after generations that kept a copy for their duration) releases every copy, and the
    layers call bitsandbytes again (control: with bitsandbytes' matmul patched to fail, the dropped model fails)."""
    import bitsandbytes as bnb
    import torch

    from job.model import dequantized_bytes, drop_dequantized, four_bit_layers, keep_dequantized

    # On a GPU machine, on the GPU: earlier tests in the process may have patched the Llama module with Liger's
    # Triton kernels, which take CUDA tensors only.
    model = four_bit_lora_model(tiny_model, "cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(2)).to(model.device)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    added = keep_dequantized(model)
    assert drop_dequantized(model) == added == dequantized_bytes(model)
    assert drop_dequantized(model) == 0
    assert not any("_dequantized" in m._buffers or "forward" in m.__dict__ for m in four_bit_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("bitsandbytes called")))
    with pytest.raises(AssertionError, match="bitsandbytes called"), torch.no_grad():
        model(input_ids=ids)


def test_kv_cache_size_per_token_follows_the_config():
    from transformers import LlamaConfig

    from job.model import kv_cache_bytes_per_token

    # llm-jp-3-13b: 40 layers, 40 heads of 128, no grouped KV: 800 KiB per token
    assert kv_cache_bytes_per_token(LlamaConfig(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40)) == 819200
    assert kv_cache_bytes_per_token(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                num_key_value_heads=2)) == 2 * 2 * 2 * 16 * 2
    assert kv_cache_bytes_per_token(object()) is None


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="generation memory is planned on a GPU only")
def test_generations_on_a_gpu_use_a_copy_for_their_duration_and_answer_the_same(tiny_model, caplog):
    """On CUDA the before/after generations keep a dequantized copy while they run and batch by the KV cache's size:
    the greedy answers are those of bitsandbytes' own path, and the copy is gone (and its memory back) afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job import evaluate
    from job.model import four_bit_layers, keep_dequantized, load_tokenizer, quantization_config
    from job.settings import QuantSettings, load_settings

    caplog.set_level(logging.INFO, logger="job")  # the generation plan is an INFO record
    m = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(QuantSettings()),
                                             dtype=torch.bfloat16, device_map={"": "cuda"})
    model = get_peft_model(m, LoraConfig(r=8, target_modules="all-linear"))
    tok, _ = load_tokenizer(tiny_model, None, "auto")  # with the prompt format the job gives it
    prompts = [evaluate.Prompt([{"role": "user", "content": f"question {i} " * (i + 1)}]) for i in range(6)]
    env = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o", "JOB_EVAL_MAX_NEW_TOKENS": "12"}
    plain = evaluate._generate_logged("before", model, tok, prompts, load_settings({**env, "JOB_QUANT__KEEP_DEQUANTIZED": "false"}))
    assert not any("for the duration" in r.getMessage() for r in caplog.records)  # `false` means no copy here either
    allocated = torch.cuda.memory_allocated()
    caplog.clear()
    fast = evaluate._generate_logged("before", model, tok, prompts, load_settings(env))
    assert any("dequantized copy of the 4-bit base for the duration" in r.getMessage() for r in caplog.records)
    assert not any("_dequantized" in layer._buffers for layer in four_bit_layers(model))
    assert torch.cuda.memory_allocated() <= allocated + 2**20  # the copy's memory is back
    assert all(g["text"] is not None for g in fast) and len(fast) == len(plain) == len(prompts)
    # The same answers as with a copy kept for the whole run (what training uses: the products the CPU test checks
    # against bitsandbytes); bitsandbytes' own path for a few tokens is a fused kernel that rounds differently.
    keep_dequantized(model)
    caplog.clear()
    kept = evaluate._generate_logged("before", model, tok, prompts, load_settings(env))
    assert not any("for the duration" in r.getMessage() for r in caplog.records)
    assert [g["text"] for g in fast] == [g["text"] for g in kept]

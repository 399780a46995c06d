"""job/model.py: the 4-bit base keeps bitsandbytes' differentiable layout on every host.

On CPUs with AVX512-BF16 (most current cloud Xeons) bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference
kernel the first time the layer runs in eval mode without grad, and from then on drops the gradient through the base
(`gemv_4bit` has no autograd). The job's before answers and evaluate() run exactly such forwards before training."""

from __future__ import annotations

import pytest
from conftest import four_bit_lora_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _host_repacks() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _grads_after(model, eval_forward_first: bool):
    import torch

    ids = torch.randint(5, 500, (2, 32), generator=torch.Generator().manual_seed(3))
    if eval_forward_first:  # what the "before" answers and trainer.evaluate() do
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_an_eval_forward_before_training_leaves_the_lora_gradients_exactly_as_they_were(tiny_model):
    """The same LoRA gradients with and without an eval-mode no-grad forward first (the fix), on this host; on an
    AVX512-BF16 host the control (bitsandbytes' own flag back on) shows the forward breaking them."""
    import torch

    from job.model import four_bit_layers

    plain = _grads_after(four_bit_lora_model(tiny_model), eval_forward_first=False)
    fixed_model = four_bit_lora_model(tiny_model)
    fixed = _grads_after(fixed_model, eval_forward_first=True)
    assert plain.keys() == fixed.keys() and plain
    for n in plain:
        torch.testing.assert_close(fixed[n], plain[n], atol=0, rtol=0)
    assert not any(getattr(l.weight.quant_state, "packing_format_for_cpu", False) for l in four_bit_layers(fixed_model))

    if not _host_repacks():
        return  # the control needs bitsandbytes' AVX512-BF16 CPU kernel; on this host nothing repacks either way
    broken_model = four_bit_lora_model(tiny_model)
    for layer in four_bit_layers(broken_model):
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this host
    broken = _grads_after(broken_model, eval_forward_first=True)
    assert all(getattr(l.weight.quant_state, "packing_format_for_cpu", False) for l in four_bit_layers(broken_model))
    worst = max(float((broken[n] - plain[n]).abs().max() / plain[n].abs().max()) for n in plain)
    assert worst > 0.1, worst


def test_load_base_model_turns_the_repacking_off_even_where_bitsandbytes_would_repack(tiny_model, tmp_path, monkeypatch):
    """Holds on any host: bitsandbytes is told the CPU has the kernel, and every 4-bit layer the job loads still has
    the repacking off (control: the same load without keep_4bit_layout keeps bitsandbytes' flag on)."""
    import bitsandbytes.nn.modules as bnb_modules

    from job import model as job_model
    from job.settings import load_settings

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp_path),
                       "JOB_OUTPUT": str(tmp_path / "out")})
    layers = job_model.four_bit_layers(job_model.load_base_model(tiny_model, s))
    assert layers and not any(l.support_avx512bf16_for_cpu for l in layers)

    monkeypatch.setattr(job_model, "keep_4bit_layout", lambda m: 0)
    control = job_model.four_bit_layers(job_model.load_base_model(tiny_model, s))
    assert control and all(l.support_avx512bf16_for_cpu for l in control)


@pytest.mark.skipif("not _host_repacks()", reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
def test_a_weight_repacked_before_the_job_saw_it_is_unpacked_to_the_same_bytes(tiny_model):
    import torch

    from job.model import four_bit_layers, keep_4bit_layout

    model = four_bit_lora_model(tiny_model)
    original = [l.weight.data.clone() for l in four_bit_layers(model)]
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert all(l.weight.quant_state.packing_format_for_cpu for l in four_bit_layers(model))
    assert keep_4bit_layout(model) == 2 * len(original)  # flag off and unpacked, every layer
    for layer, w in zip(four_bit_layers(model), original):
        assert not layer.weight.quant_state.packing_format_for_cpu
        assert torch.equal(layer.weight.data.view(torch.uint8).flatten(), w.view(torch.uint8).flatten())

"""job/lora.py: the lean LoRA forward trains like PEFT's own (same loss and gradients under bf16 autocast, the same
dropout masks), really replaces it, and lets checkpointing's recompute skip the base GEMM of each layer's last
projection. The speed it buys is measured on the GPU (docs/benchmarks.md, lever 15)."""

from __future__ import annotations

import pytest
from conftest import four_bit_lora_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif("not __import__('torch').cuda.is_available()"))]


def _model(tiny_model, device, *, kept=False, dropout=0.1, compute_dtype="bfloat16"):
    from job.model import keep_dequantized

    m = four_bit_lora_model(tiny_model, device, dropout=dropout, compute_dtype=compute_dtype, fp32_adapter=True)
    if kept:
        assert keep_dequantized(m) > 0
    return m.train()


def _step(m, ids, seed=5, autocast=True):
    import torch

    torch.manual_seed(seed)  # the same dropout masks for the same seed
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = m(input_ids=ids, labels=ids)
    m.zero_grad()
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}


def _worst(grads, reference):
    """The largest relative error of any LoRA gradient against the reference's."""
    return max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kept", [False, True], ids=["4bit", "kept-copy"])
def test_lean_forward_trains_like_peft(tiny_model, device, kept, monkeypatch):
    """Under bf16 autocast the lean forward's loss and LoRA gradients are as close to an fp32 reference (the same 4-bit
    model and adapter computed in fp32) as PEFT's own forward's are: the two sum the same products in another order,
    and bf16 rounding alone moves a gradient of this tiny model by several percent. With dropout, the lean forward
    draws PEFT's masks: its gradients are far closer to PEFT's with the same seed than PEFT's are to themselves with
    another seed. (The reference has no dropout: on CUDA an fp32 tensor draws other masks than a bf16 one.)
    Controls: the lean layers with the adapter's scaling left out are several times further from the reference; and
    the lean model keeps running when PEFT's forward is made to fail, which the PEFT model does not (so the lean path
    is the one measured)."""
    import torch
    from peft.tuners.lora.bnb import Linear4bit

    from job import lora

    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    peft_model = _model(tiny_model, device, kept=kept, dropout=0.0)
    lean_model = _model(tiny_model, device, kept=kept, dropout=0.0)
    reference = _model(tiny_model, device, compute_dtype="float32", dropout=0.0)
    reference.load_state_dict({k: v.float() for k, v in peft_model.state_dict().items() if "lora_" in k}, strict=False)
    assert lora.make_lean(lean_model) == len(lora.lora_layers(lean_model)) == 14  # 2 layers x 7 projections
    assert lora.make_lean(lean_model) == 0  # once
    loss_r, grads_r = _step(reference, ids, autocast=False)
    loss_p, grads_p = _step(peft_model, ids)
    loss_l, grads_l = _step(lean_model, ids)
    assert grads_l.keys() == grads_p.keys() == grads_r.keys()
    assert abs(loss_l - loss_r) <= 1.5 * abs(loss_p - loss_r) + 1e-3 * loss_r
    peft_error, lean_error = _worst(grads_p, grads_r), _worst(grads_l, grads_r)
    assert lean_error <= 1.2 * peft_error, (lean_error, peft_error)
    for layer in lora.lora_layers(lean_model):
        layer.scaling["default"] = 1.0  # alpha/r = 2 in the model: the adapter's half of each sum is off by 2x
    _, unscaled = _step(lean_model, ids)
    assert _worst(unscaled, grads_r) > 3 * peft_error

    peft_model = _model(tiny_model, device, kept=kept, dropout=0.1)
    lean_model = _model(tiny_model, device, kept=kept, dropout=0.1)
    lora.make_lean(lean_model)
    loss_p, grads_p = _step(peft_model, ids)
    loss_l, grads_l = _step(lean_model, ids)
    _, other_masks = _step(peft_model, ids, seed=6)
    assert abs(loss_l - loss_p) < 0.01 * loss_p
    assert _worst(grads_l, grads_p) < 0.2 * _worst(other_masks, grads_p), (_worst(grads_l, grads_p), _worst(other_masks, grads_p))

    def broken(self, *a, **kw):
        raise AssertionError("PEFT's forward was called")

    monkeypatch.setattr(Linear4bit, "forward", broken)
    _step(lean_model, ids)  # no AssertionError: every layer took the lean path
    with pytest.raises(AssertionError, match="PEFT's forward was called"):
        _step(peft_model, ids)


def test_outside_autocast_and_with_adapters_disabled_it_is_peft_forward(tiny_model):
    """Where the lean path does not apply (no autocast: inference, CPU training in fp32; the adapter disabled: DPO's
    reference) the lean model gives PEFT's outputs exactly."""
    import torch

    from job import lora

    peft_model = _model(tiny_model, "cpu").eval()
    lean_model = _model(tiny_model, "cpu").eval()
    lora.make_lean(lean_model)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lean_model(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16), lean_model.disable_adapter(), peft_model.disable_adapter():
            torch.testing.assert_close(lean_model(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=0)
    assert lora.undo(lean_model) == 14 and lora.undo(lean_model) == 0


@pytest.mark.parametrize("make_lean", [True, False], ids=["lean", "peft-control"])
def test_checkpointing_does_not_recompute_the_last_projection(tiny_model, make_lean):
    """With non-reentrant checkpointing (the job's), each decoder layer's forward runs again in the backward. The lean
    forward saves everything the backward needs before calling the base layer, so torch's early stop ends each
    recompute before the base GEMM of the layer's last projection (down_proj): one call per step instead of two,
    every other projection two. The control (PEFT's forward) calls down_proj's base twice."""
    import torch

    from job import lora

    model = _model(tiny_model, "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if make_lean:
        lora.make_lean(model)
    calls: dict[str, int] = {}
    for layer in lora.lora_layers(model):
        name = layer.base_layer.__class__.__name__ + ":" + next(n for n, m in model.named_modules() if m is layer)
        layer.base_layer.register_forward_hook(lambda *_, key=name: calls.__setitem__(key, calls.get(key, 0) + 1))
    ids = torch.randint(5, 500, (2, 32), generator=torch.Generator().manual_seed(3))
    _step(model, ids)
    down = {k: v for k, v in calls.items() if k.endswith("down_proj")}
    others = {k: v for k, v in calls.items() if not k.endswith("down_proj")}
    assert len(down) == 2 and len(others) == 12 and all(k.startswith("Linear4bit:") for k in calls)
    assert set(others.values()) == {2}  # forward + recompute
    assert set(down.values()) == ({1} if make_lean else {2})


def _variant_model(tiny_model, **lora):
    """The tiny model in NF4 with an adapter of this LoraConfig whose B is not zero (init_lora_weights=False, then the
    same seeded values for every variant), so that the adapter and its scaling change the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.model import keep_4bit_layout, quantization_config
    from job.settings import QuantSettings

    m = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(QuantSettings()),
                                             dtype=torch.bfloat16, device_map={"": "cpu"})
    keep_4bit_layout(m)
    torch.manual_seed(0)
    model = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **lora))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            p.data = torch.randn(p.shape, dtype=torch.float32) * 0.05  # fp32, as the job trains them
    return model.eval()


def _logits(model, ids):
    import torch

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids).logits.float()


def test_lean_forward_is_decided_by_the_lora_variant():
    """lean_forward_applies reads PEFT's own variant metadata: plain LoRA and rsLoRA (a scaling only) yes; DoRA, any
    other field PEFT marks as a variant, or a bias on B: no, with the reason."""
    from peft import LoraConfig

    from job.lora import lean_forward_applies

    assert lean_forward_applies(LoraConfig(r=8)) == (True, "plain LoRA")
    assert lean_forward_applies(LoraConfig(r=8, use_rslora=True, init_lora_weights="gaussian")) == (True, "plain LoRA (rsLoRA scaling)")
    ok, why = lean_forward_applies(LoraConfig(r=8, use_dora=True))
    assert not ok and "use_dora" in why
    assert lean_forward_applies(LoraConfig(r=8, alora_invocation_tokens=[5]))[0] is False
    assert lean_forward_applies(LoraConfig(r=8, lora_bias=True)) == (False, "lora_bias: B has a bias")


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_lean_forward_equals_peft_for_plain_lora_and_rslora(tiny_model, variant):
    """Under bf16 autocast (where the lean forward runs) its logits are PEFT's up to bf16 rounding of another summation
    order, for plain LoRA and for rsLoRA: the difference is far smaller than what the scaling changes (alpha/r = 2
    against alpha/sqrt(r) = 5.7), so a lean forward that used the wrong scaling would fail here."""
    import torch

    from job import lora

    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    peft_model = _variant_model(tiny_model, **variant)
    other = _variant_model(tiny_model, use_rslora=not variant)  # the same weights, the other scaling
    lean_model = _variant_model(tiny_model, **variant)
    assert lora.make_lean(lean_model) == 14
    reference, lean, other_scaling = _logits(peft_model, ids), _logits(lean_model, ids), _logits(other, ids)
    scale = (other_scaling - reference).abs().max()
    assert (lean - reference).abs().max() < 0.05 * scale, ((lean - reference).abs().max(), scale)


def test_dora_keeps_peft_forward(tiny_model):
    """With DoRA the lean forward is not installed (make_lean: 0 layers) and the outputs are PEFT's exactly. Control:
    the lean forward forced onto the DoRA layers (its per-call guard blinded too) gives other outputs: DoRA's
    magnitude rescaling is missing from it."""
    import types

    import torch

    from job import lora

    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    peft_model, dora = _variant_model(tiny_model, use_dora=True), _variant_model(tiny_model, use_dora=True)
    assert lora.make_lean(dora) == 0 and not any("forward" in layer.__dict__ for layer in lora.lora_layers(dora))
    torch.testing.assert_close(_logits(dora, ids), _logits(peft_model, ids), rtol=0, atol=0)

    for layer in lora.lora_layers(dora):
        layer.forward = types.MethodType(lora._lean_forward, layer)
        layer.lora_variant = {}  # blind the per-call guard: what the lean path alone computes for a DoRA layer
    forced, reference = _logits(dora, ids), _logits(peft_model, ids)
    assert (forced - reference).abs().max() > 0.1 * reference.abs().max()


@pytest.mark.parametrize("optim", ["auto", "adamw_torch_fused"])
def test_loraplus_gives_b_its_learning_rate_through_the_trainer(tiny_model, tmp_path, optim):
    """JOB_TRAIN__LORAPLUS_LR_RATIO: the trainer's optimizer is PEFT's create_loraplus_optimizer over JOB_TRAIN__OPTIM's
    optimizer class: every lora_A at LEARNING_RATE, every lora_B at ratio x LEARNING_RATE, and the scheduler keeps the
    ratio. Control: without it, transformers' one learning rate for all."""
    import torch
    from conftest import tokenized

    from job.model import load_base_model, load_tokenizer
    from job.settings import load_settings
    from job.stages import sft

    record = {"prompt": [{"role": "user", "content": "日本の首都は？"}], "completion": [{"role": "assistant", "content": "東京です。"}]}
    base = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp_path), "JOB_OUTPUT": str(tmp_path / "o"),
            "JOB_WORKDIR": str(tmp_path / "w"), "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__OPTIM": optim,
            "JOB_TRAIN__LEARNING_RATE": "1e-4", "JOB_TRAIN__WEIGHT_DECAY": "0.01"}
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    for ratio in ("16", None):
        s = load_settings({**base, **({"JOB_TRAIN__LORAPLUS_LR_RATIO": ratio} if ratio else {})})
        trainer = sft.build_trainer(s, load_base_model(tiny_model, s), tok, tokenized(tok, "sft", [record] * 2, 128), None,
                                    tmp_path / "ck", [], progress_bar=False)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
        lrs = {names[id(p)]: g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}  # before warmup
        assert sorted(lrs) == sorted(names.values()) and len(lrs) == 28  # every trainable weight, once
        a = {v for n, v in lrs.items() if ".lora_A." in n}
        b = {v for n, v in lrs.items() if ".lora_B." in n}
        assert type(trainer.optimizer).__name__ == "AdamW"
        # `auto` is fused AdamW on a GPU, plain AdamW on the CPU (job/trainargs.py)
        fused = optim.endswith("fused") or (optim == "auto" and torch.cuda.is_available())
        assert trainer.optimizer.defaults.get("fused") is (True if fused else None)
        if ratio is None:
            assert a == b == {1e-4}
            continue
        assert a == {1e-4} and b == {16e-4}
        assert {g["weight_decay"] for g in trainer.optimizer.param_groups if g["params"]} == {0.01}
        trainer.lr_scheduler.step()
        a_lr, b_lr = (next(g["lr"] for g in trainer.optimizer.param_groups if g["params"] and part in names[id(g["params"][0])])
                      for part in (".lora_A.", ".lora_B."))
        assert 0 < a_lr and b_lr == pytest.approx(16 * a_lr)

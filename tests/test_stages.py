"""Training semantics on the real 4-bit path (bitsandbytes NF4 on CPU): what is trained, and DPO's reference."""

import pytest
import torch

from job.model import INSTRUCTION_TEMPLATE, load_adapter, load_base_model, load_tokenizer
from job.settings import load_settings
from job.stages import dpo, sft

from conftest import tokenized


def settings(tiny_model, tmp_path, stage, **extra):
    return load_settings({"JOB_STAGE": stage, "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp_path), "JOB_OUTPUT": str(tmp_path / "out"),
                          "JOB_WORKDIR": str(tmp_path / "w"), "JOB_TRAIN__SAVE_STEPS": "0", "JOB_LOG_FORMAT": "json", **extra})


RECORD = {"prompt": [{"role": "user", "content": "日本の首都は？"}], "completion": [{"role": "assistant", "content": "東京です。"}]}
PAIR = {"prompt": RECORD["prompt"], "chosen": RECORD["completion"], "rejected": [{"role": "assistant", "content": "大阪です。"}]}


def rows(tok, stage, records):
    return tokenized(tok, stage, records, 128)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_loss_covers_exactly_the_answer_and_eos(tiny_model, tmp_path, packing):
    s = settings(tiny_model, tmp_path, "sft", JOB_TRAIN__PACKING=packing)
    tok, fmt = load_tokenizer(tiny_model, None, "auto")
    assert fmt == "instruction" and tok.chat_template == INSTRUCTION_TEMPLATE
    model = load_base_model(tiny_model, s)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    trainer = sft.build_trainer(s, model, tok, rows(tok, "sft", [RECORD, RECORD]), None, tmp_path / "ck", [], progress_bar=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = ids[labels != -100]
    answer = tok("東京です。", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Both examples: every answer token and the EOS are trained, nothing else (no prompt, no template, no padding).
    assert trained.tolist() == answer * 2 if packing == "true" else trained.tolist() == answer
    text = tok.decode(ids[: (labels != -100).nonzero()[0].item()])
    assert text == "<s>### 指示\n日本の首都は？\n### 回答\n"


def test_dpo_reference_is_the_frozen_sft_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    # An "SFT adapter" with non-zero weights (a fresh LoRA has B=0 and would equal the base model).
    base = load_base_model(tiny_model, settings(tiny_model, tmp_path, "sft"))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    peft_model.save_pretrained(tmp_path / "sft_adapter")
    tok.save_pretrained(tmp_path / "sft_adapter")
    saved = load_file(tmp_path / "sft_adapter" / "adapter_model.safetensors")

    s = settings(tiny_model, tmp_path, "dpo", JOB_TRAIN__MAX_STEPS="3", JOB_TRAIN__LEARNING_RATE="1e-2", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
                 JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1")
    model = load_adapter(load_base_model(tiny_model, s), tmp_path / "sft_adapter")
    trainer = dpo.build_trainer(s, model, tok, rows(tok, "dpo", [PAIR] * 4), None, tmp_path / "ck", [], progress_bar=False)
    m = trainer.model
    assert set(m.peft_config) == {"default", "ref"}

    def weights(adapter):
        return {n.replace(f".{adapter}.", "."): p.detach().float().clone() for n, p in m.named_parameters() if f".{adapter}." in n}

    ref_before, policy_before = weights("ref"), weights("default")
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".ref." in n)
    assert set(ref_before) == set(saved)
    for name, value in saved.items():  # the reference and the policy start as exactly the SFT adapter
        assert torch.equal(ref_before[name], value.float()) and torch.equal(policy_before[name], value.float()), name
    trainer.train()
    ref_after, policy_after = weights("ref"), weights("default")
    assert all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before)  # frozen
    assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)  # the policy trained


def _trainable_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("stage, continued", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True)])
def test_adapter_weights_train_and_save_in_fp32(tiny_model, tmp_path, stage, continued):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    tok, _ = load_tokenizer(tiny_model, None, "auto")
    s = settings(tiny_model, tmp_path, stage, JOB_TRAIN__MAX_STEPS="2", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
                 JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1")
    model = load_base_model(tiny_model, s)
    assert {p.dtype for p in model.parameters() if p.dtype.is_floating_point} == {torch.bfloat16}  # bf16 compute base
    if continued:
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / "given")
        model = load_adapter(load_base_model(tiny_model, s), tmp_path / "given")
    module, data = (sft, [RECORD] * 4) if stage == "sft" else (dpo, [PAIR] * 4)
    trainer = module.build_trainer(s, model, tok, rows(tok, stage, data), None, tmp_path / "ck", [], progress_bar=False)
    assert _trainable_dtypes(trainer.model) == {torch.float32}
    trainer.train()
    assert _trainable_dtypes(trainer.model) == {torch.float32}
    trainer.model.save_pretrained(tmp_path / "out", selected_adapters=["default"])
    assert {v.dtype for v in load_file(tmp_path / "out" / "adapter_model.safetensors").values()} == {torch.float32}
    assert isinstance(trainer.model, PeftModel)


def test_control_trls_own_trainer_keeps_qlora_adapters_in_bf16(tiny_model, tmp_path):
    """Why the job restores fp32: TRL's trainer alone casts the trainable LoRA weights of a 4-bit model to bf16."""
    from trl import SFTTrainer

    from job.model import lora_config

    tok, _ = load_tokenizer(tiny_model, None, "auto")
    s = settings(tiny_model, tmp_path, "sft", JOB_TRAIN__MAX_STEPS="1")
    args = sft.training_args(s, tmp_path / "ck", has_eval=False, progress_bar=False)
    from datasets import Dataset

    trainer = SFTTrainer(model=load_base_model(tiny_model, s), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(rows(tok, "sft", [RECORD] * 2)), peft_config=lora_config(s.lora))
    assert _trainable_dtypes(trainer.model) == {torch.bfloat16}

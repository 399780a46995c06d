"""Training semantics on the real 4-bit path (bitsandbytes NF4 on CPU): what is trained, and DPO's reference."""

import pytest
import torch

from job.model import INSTRUCTION_TEMPLATE, load_adapter, load_base_model, load_tokenizer
from job.settings import load_settings
from job.stages import dpo, sft


def settings(tiny_model, tmp_path, stage, **extra):
    return load_settings({"JOB_STAGE": stage, "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp_path), "JOB_OUTPUT": str(tmp_path / "out"),
                          "JOB_WORKDIR": str(tmp_path / "w"), "JOB_TRAIN__SAVE_STEPS": "0", "JOB_LOG_FORMAT": "json", **extra})


RECORD = {"prompt": [{"role": "user", "content": "日本の首都は？"}], "completion": [{"role": "assistant", "content": "東京です。"}]}


@pytest.mark.parametrize("packing", ["false", "true"])
def test_loss_covers_exactly_the_answer_and_eos(tiny_model, tmp_path, packing):
    from datasets import Dataset

    s = settings(tiny_model, tmp_path, "sft", JOB_TRAIN__PACKING=packing)
    tok, fmt = load_tokenizer(tiny_model, None, "auto")
    assert fmt == "instruction" and tok.chat_template == INSTRUCTION_TEMPLATE
    model = load_base_model(tiny_model, s)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    trainer = sft.build_trainer(s, model, tok, Dataset.from_list([RECORD, RECORD]), None, tmp_path / "ck", [], progress_bar=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = ids[labels != -100]
    answer = tok("東京です。", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Both examples: every answer token and the EOS are trained, nothing else (no prompt, no template, no padding).
    assert trained.tolist() == answer * 2 if packing == "true" else trained.tolist() == answer
    text = tok.decode(ids[: (labels != -100).nonzero()[0].item()])
    assert text == "<s>### 指示\n日本の首都は？\n### 回答\n"


def test_dpo_reference_is_the_frozen_sft_adapter(tiny_model, tmp_path):
    from datasets import Dataset
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
    pair = {"prompt": RECORD["prompt"], "chosen": RECORD["completion"], "rejected": [{"role": "assistant", "content": "大阪です。"}]}
    trainer = dpo.build_trainer(s, model, tok, Dataset.from_list([pair] * 4), None, tmp_path / "ck", [], progress_bar=False)
    m = trainer.model
    assert set(m.peft_config) == {"default", "ref"}

    def weights(adapter):
        return {n.replace(f".{adapter}.", "."): p.detach().float().clone() for n, p in m.named_parameters() if f".{adapter}." in n}

    ref_before, policy_before = weights("ref"), weights("default")
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".ref." in n)
    assert set(ref_before) == set(saved)
    for name, value in saved.items():  # the reference starts as exactly the SFT adapter (bf16-rounded by TRL for QLoRA)
        assert torch.allclose(ref_before[name], value.float(), rtol=1e-2, atol=1e-3), name
    trainer.train()
    ref_after, policy_after = weights("ref"), weights("default")
    assert all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before)  # frozen
    assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)  # the policy trained

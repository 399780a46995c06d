"""Length-sorted micro-batches: each optimizer step holds the examples random sampling would give it, micro-batches of
similar length pad less, and a step's loss does not depend on how its examples are grouped into micro-batches."""

import random

import pytest
import torch

from job.model import load_base_model, load_tokenizer
from job.stages import dpo, sft
from job.stages.common import StepSortedSampler
from tests.test_stages import settings

from conftest import tokenized


def test_each_step_holds_a_random_draw_sorted_longest_first():
    lengths = [random.Random(i).randint(5, 500) for i in range(103)]
    sampler = StepSortedSampler(lengths, step=16, seed=7)
    order = list(sampler)
    assert sorted(order) == list(range(103))  # every example once per epoch
    permutation = torch.randperm(103, generator=torch.Generator().manual_seed(7)).tolist()
    for i in range(0, 103, 16):
        step = order[i : i + 16]
        assert set(step) == set(permutation[i : i + 16])  # the same examples as the random draw
        assert [lengths[j] for j in step] == sorted((lengths[j] for j in step), reverse=True)
    assert list(StepSortedSampler(lengths, 16, 7)) == order  # resumable: same seed, same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != order


def pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    words = "東京 大阪 京都 山 川 海 空 花 雨 雪 風".split()

    def text(k):
        return "".join(rng.choice(words) for _ in range(k))

    # Prompts from short to long (like real instruction sets), answers of similar length within a pair.
    return [{"prompt": [{"role": "user", "content": text(int(rng.lognormvariate(2.5, 1.0)) + 1)}],
             "chosen": [{"role": "assistant", "content": text(5)}],
             "rejected": [{"role": "assistant", "content": text(5)}]} for _ in range(n)]


def padding(batches) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


def test_dpo_micro_batches_pad_less_and_give_the_same_step_loss(tiny_model, tmp_path):
    s = settings(tiny_model, tmp_path, "dpo", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="4",
                 JOB_LORA__DROPOUT="0")
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    trainer = dpo.build_trainer(s, load_base_model(tiny_model, s), tok, tokenized(tok, "dpo", pairs(32)), None, tmp_path / "ck", [],
                                progress_bar=False)
    loader = trainer.get_train_dataloader()
    samplers = [loader.batch_sampler, getattr(loader.batch_sampler, "batch_sampler", None)]
    assert any(isinstance(getattr(b, "sampler", None), StepSortedSampler) for b in samplers)  # what training iterates
    sorted_batches = list(loader)
    ds = trainer.train_dataset
    collate = trainer.data_collator
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(s.train.seed)).tolist()
    random_batches = [collate([ds[j] for j in order[i : i + 2]]) for i in range(0, len(ds), 2)]
    assert sum(b["attention_mask"].sum() for b in sorted_batches) == sum(b["attention_mask"].sum() for b in random_batches)
    assert padding(sorted_batches) < 0.5 * padding(random_batches)

    # One step (8 pairs): the loss averaged over its 4 micro-batches, grouped sorted vs as drawn. A policy that differs
    # from the reference: with a fresh LoRA (B = 0) every pair's loss is exactly ln 2 whatever the grouping.
    step = list(trainer._get_train_sampler())[:8]
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.model.eval()

    def step_loss(groups):
        with torch.no_grad():
            return sum(trainer.compute_loss(trainer.model, collate([ds[j] for j in g])).item() for g in groups) / len(groups)

    as_sorted = step_loss([step[i : i + 2] for i in range(0, 8, 2)])
    interleaved = step_loss([step[i::4] for i in range(4)])  # longest with shortest
    assert abs(as_sorted - 0.6931471805599453) > 1e-3, "policy equal to the reference: the comparison would not tell"
    assert as_sorted == pytest.approx(interleaved, rel=1e-4, abs=1e-5)


def test_unpacked_sft_uses_sorted_steps_and_packed_sft_does_not(tiny_model, tmp_path):
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    records = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs(12)]
    for packing, expected in (("false", StepSortedSampler), ("true", None)):
        s = settings(tiny_model, tmp_path, "sft", JOB_TRAIN__PACKING=packing)
        trainer = sft.build_trainer(s, load_base_model(tiny_model, s), tok, tokenized(tok, "sft", records), None, tmp_path / "ck", [],
                                    progress_bar=False)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, StepSortedSampler) == (expected is not None)

    # Unpacked: the loss is normalised by the step's answer tokens (num_items_in_batch), so grouping does not matter.
    s = settings(tiny_model, tmp_path, "sft", JOB_TRAIN__PACKING="false", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
                 JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="4", JOB_LORA__DROPOUT="0")
    trainer = sft.build_trainer(s, load_base_model(tiny_model, s), tok, tokenized(tok, "sft", records), None, tmp_path / "ck", [],
                                progress_bar=False)
    ds, collate = trainer.train_dataset, trainer.data_collator
    step = list(trainer._get_train_sampler())[:8]
    items = sum(int((collate([ds[j]])["labels"] != -100).sum()) for j in step)
    trainer.model.eval()

    def step_loss(groups):
        with torch.no_grad():
            return sum(trainer.compute_loss(trainer.model, collate([ds[j] for j in g]), num_items_in_batch=items).item() for g in groups)

    assert step_loss([step[i : i + 2] for i in range(0, 8, 2)]) == pytest.approx(step_loss([step[i::4] for i in range(4)]), rel=1e-4)


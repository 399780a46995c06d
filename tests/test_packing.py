"""Packing is on by default (several examples per row, padding-free): it must train on exactly what unpacked
training would. A packed batch, as TRL's collator builds it for the job, gives every example the same per-token
log-probabilities (hence the same loss) as that example alone: no attention across examples, positions restarting.

The control shows the test can fail: the same packed row with positions that run on across examples (what a
collator without per-example position ids would give) changes the losses of every example after the first.
"""

import json

import pytest
import torch

from job import data
from job.model import load_base_model, load_tokenizer
from job.settings import ColumnSettings, load_settings
from job.stages import sft

from conftest import DEMO_DATA

ATOL = 1e-5  # fp32 on CPU: the packed and the single forward differ only by summation order


def _records():
    # The demo's QA records plus longer ones, so that rows hold examples of very different lengths.
    rows = [json.loads(line) for line in (DEMO_DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows += [{"text": r["text"] * 3, "output": r["output"] * 4} for r in rows[:6]]
    return [data._sft_record(r, *data._sft_format(set(r), ColumnSettings()), "test") for r in rows]


@pytest.fixture(scope="module")
def packed(tiny_model, tmp_path_factory):
    from datasets import Dataset

    tmp = tmp_path_factory.mktemp("packing")
    # fp32 weights (no 4-bit) so that the comparison is exact to fp32 rounding; attention as the job loads it (sdpa).
    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp), "JOB_OUTPUT": str(tmp / "out"),
                       "JOB_WORKDIR": str(tmp / "w"), "JOB_QUANT__LOAD_IN": "none", "JOB_QUANT__COMPUTE_DTYPE": "float32",
                       "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "4", "JOB_TRAIN__MAX_LENGTH": "160", "JOB_TRAIN__SAVE_STEPS": "0"})
    assert s.train.packing, "packing is the default"
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    model = load_base_model(tiny_model, s)
    assert model.config._attn_implementation == "sdpa"
    # Without a KV cache: with one, transformers does not look for packed sequences and attention crosses examples.
    assert model.config.use_cache is False
    trainer = sft.build_trainer(s, model, tok, Dataset.from_list(_records()), None, tmp / "ck", [], progress_bar=False)
    batch = next(iter(trainer.get_train_dataloader()))  # exactly what the trainer feeds the model
    m = trainer.model
    m.eval()  # LoRA dropout off: both forwards must be deterministic
    with torch.no_grad():  # a LoRA that does something (a fresh one has B = 0)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m, batch


def _segments(position_ids):
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.numel()]))


def _token_logps(model, input_ids, position_ids, **extra):
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, **extra).logits.float()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, input_ids[0, 1:, None])[:, 0]  # logp of token t+1


def _per_example(model, batch, position_ids):
    """Per example: (NLL of its trained tokens from the packed forward, the same from the example alone)."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    packed_lp = _token_logps(model, ids, position_ids)
    out = []
    for a, b in _segments(batch["position_ids"][0].cpu()):
        trained = labels[0, a + 1 : b] != -100  # labels of tokens a+1..b-1, predicted from positions a..b-2
        alone_lp = _token_logps(model, ids[:, a:b], torch.arange(b - a)[None])
        out.append((packed_lp[a : b - 1][trained], alone_lp[trained]))
    return out


def test_packed_batch_is_padding_free_with_restarting_positions(packed):
    _, batch = packed
    pos = batch["position_ids"][0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat row, no padding
    segs = _segments(pos)
    assert len(segs) >= 3, "the row should hold several examples"
    for a, b in segs:
        assert pos[a:b].tolist() == list(range(b - a))
        assert (batch["labels"][0, a] == -100).item()  # no example learns from the one before it


def test_packed_losses_equal_unpacked(packed):
    model, batch = packed
    per_example = _per_example(model, batch, batch["position_ids"].cpu())
    for packed_lp, alone_lp in per_example:
        assert packed_lp.numel() > 0
        torch.testing.assert_close(packed_lp, alone_lp, atol=ATOL, rtol=0)
        assert abs(packed_lp.mean().item() - alone_lp.mean().item()) < ATOL  # the example's loss
    # And the trainer's loss on the packed batch is the token-weighted mean of the unpacked examples' losses.
    all_alone = torch.cat([a for _, a in per_example])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items()})
    assert abs(out.loss.item() - (-all_alone.mean().item())) < 1e-4


def test_control_positions_running_on_change_the_losses(packed):
    """If positions did not restart per example, the packed row would be one long sequence and attention would
    cross examples: the check above must then fail for every example but the first."""
    model, batch = packed
    running = torch.arange(batch["input_ids"].shape[1])[None]
    per_example = _per_example(model, batch, running)
    diffs = [(p - a).abs().max().item() for p, a in per_example]
    assert diffs[0] < ATOL
    assert all(d > 100 * ATOL for d in diffs[1:]), diffs

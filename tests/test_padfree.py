"""Padding-free DPO (job/padfree.py, on with JOB_TRAIN__PACKING, the default): a micro-batch's chosen and rejected rows
run as one flat row, and TRL's DPO loss must come out as it does on TRL's padded batch. Built by the job's own DPO
trainer on the tiny model, the batch drawn from its dataloader as training draws it, on the job's device: on a CUDA
GPU the flat row goes through the variable-length flash kernel (job/attention.py), on the CPU through its exact
per-row fallback.

Two precisions: fp32 without quantization (equal up to summation order) and the job's defaults, NF4 with bf16 compute
(within bf16 rounding). The control shows the comparison can fail: the same flat row with the row boundaries left out
(attention across rows) leaves the first row as it is and moves a later one by far more than the tolerance.
"""

import math

import pytest
import torch

from job import attention, data, padfree
from job.settings import ColumnSettings
from job.stages import dpo

from conftest import DEMO_DATA, at_precision, tokenized

#: Per precision: the largest difference of a row's summed log-probability per answer token, of the DPO loss (relative),
#: and of a LoRA gradient relative to the largest gradient. Measured on the CPU: fp32 8e-7, 1e-6, 2e-6; NF4-bf16 1.6e-3,
#: 9e-4, 5e-3 (on CUDA: 7e-5, 3e-5, 2e-3). The control moves some row by 10x the first or more (measured 0.14 per
#: token).
TOLERANCE = {"fp32": (1e-5, 1e-5, 1e-4), "nf4-bf16": (3e-3, 5e-3, 5e-2)}


def _pairs():
    pairs = data.load_records(DEMO_DATA / "dpo.csv", "dpo.csv", "dpo", ColumnSettings())
    # Pairs of very different lengths in one micro-batch, so that TRL's padded batch has real padding.
    for i, p in enumerate(pairs[:4]):
        long = dict(p)
        long["chosen"] = [{"role": "assistant", "content": p["chosen"][0]["content"] * (3 + i)}]
        pairs.append(long)
    return pairs


@pytest.fixture(scope="module", params=["fp32", "nf4-bf16"])
def built(request, tiny_model, tmp_path_factory):
    precision = request.param
    tmp = tmp_path_factory.mktemp("padfree")
    s, tok, model = at_precision(tiny_model, tmp, "dpo", precision, JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="4",
                                 JOB_TRAIN__MAX_LENGTH="192", JOB_LORA__DROPOUT="0")
    assert s.train.packing, "packing (padding-free DPO) is the default"
    assert model.config._attn_implementation == attention.NAME
    trainer = dpo.build_trainer(s, model, tok, tokenized(tok, "dpo", _pairs(), 192), None, tmp / "ck", [], progress_bar=False)
    assert trainer.job_padding_free
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference (a fresh LoRA has B = 0: every DPO loss is ln 2)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.model.eval()
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    # The micro-batch with the most padding: where padding-free changes the most.
    batch = max(batches, key=lambda b: (b["attention_mask"] == 0).sum().item())
    return precision, trainer, batch


def _padded(batch):
    return {k: v for k, v in batch.items() if k != padfree.KEY}


def _row_logps(trainer, batch):
    """Each row's summed log-probability of its answer tokens, as TRL's DPO loss computes it."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
    with torch.no_grad(), trainer.compute_loss_context_manager():
        out = trainer.model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    assert out.log_probs.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
    return out.log_probs.float().sum(dim=1), (labels[:, 1:] != -100).sum(dim=1), out.log_probs.float()


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def test_batch_is_one_row_without_padding(built):
    _, trainer, batch = built
    layout = batch[padfree.KEY]
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the test batch must have padding for the comparison to mean anything"
    assert layout["index"].numel() == int(mask.sum())  # every real token once, no padding
    lengths = mask.sum(dim=1).tolist()
    assert layout["cu_seq_lens"].tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    assert layout["max_length"] == max(lengths)
    positions = layout["position_ids"][0].tolist()
    assert positions == [p for n in lengths for p in range(n)]  # restarting at each row


def test_row_logps_equal_padded(built, monkeypatch):
    precision, trainer, batch = built
    calls = []
    flat_forward = padfree._flat_forward
    monkeypatch.setattr(padfree, "_flat_forward", lambda *a: calls.append(1) or flat_forward(*a))
    flat, n, flat_tokens = _row_logps(trainer, batch)
    assert calls, "the flat path did not run"
    padded, n2, padded_tokens = _row_logps(trainer, _padded(batch))
    assert torch.equal(n, n2) and (n > 0).all()
    tol = TOLERANCE[precision][0]
    # Token by token too: each log-probability in the padded layout's place (TRL's length-weighted `ld_alpha` and its
    # entropy metrics read positions, not only sums).
    assert (flat_tokens - padded_tokens).abs().max().item() <= 10 * tol
    print(f"{precision}: rows' log-probabilities differ by {((flat - padded).abs() / n).max().item():.2e} per token at most")
    assert ((flat - padded).abs() / n).max().item() <= tol, (flat, padded)


def test_dpo_loss_and_gradients_equal_padded(built):
    precision, trainer, batch = built
    _, tol_loss, tol_grad = TOLERANCE[precision]
    flat_loss, flat_grads = _loss_and_grads(trainer, batch)
    padded_loss, padded_grads = _loss_and_grads(trainer, _padded(batch))
    assert abs(flat_loss - math.log(2)) > 0.05, "policy equal to the reference: the loss would not tell"
    print(f"{precision}: loss {flat_loss:.6f} vs {padded_loss:.6f}")
    assert abs(flat_loss - padded_loss) <= tol_loss * max(1.0, abs(padded_loss))
    scale = max(g.abs().max().item() for g in padded_grads.values())
    assert scale > 0
    worst = max((flat_grads[k] - padded_grads[k]).abs().max().item() for k in padded_grads)
    print(f"{precision}: worst gradient difference {worst / scale:.2e} of the largest")
    assert worst <= tol_grad * scale, (worst, scale)


def test_control_row_boundaries_left_out_change_the_logps(built):
    precision, trainer, batch = built
    padded, n, _ = _row_logps(trainer, _padded(batch))
    layout = dict(batch[padfree.KEY])
    total = layout["index"].numel()
    layout["cu_seq_lens"] = torch.tensor([0, total], dtype=torch.int32, device=layout["cu_seq_lens"].device)
    layout["max_length"] = total
    layout["position_ids"] = torch.arange(total, device=layout["position_ids"].device)[None]
    crossed, _, _ = _row_logps(trainer, {**batch, padfree.KEY: layout})
    diff = (crossed - padded).abs() / n
    assert diff[0].item() <= TOLERANCE[precision][0]  # the first row attends to itself only either way
    print(f"{precision}: control moves a row by {diff[1:].max().item():.2e} per token")
    assert diff[1:].max().item() > 10 * TOLERANCE[precision][0], diff

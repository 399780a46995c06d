"""Packing is on by default (several examples per row, padding-free): it must train on exactly what unpacked
training would. A packed batch, as TRL's collator builds it for the job and fed to the model as the trainer feeds it,
gives every example the same per-token log-probabilities (hence the same loss) as that example alone: no attention
across examples, positions restarting. Runs on the job's device: on a CUDA GPU the packed rows go through the
variable-length flash kernel (job/attention.py), on the CPU through its per-example fallback.

Two precisions: fp32 without quantization (exact up to summation order), and the job's defaults, NF4 4-bit with bf16
compute (within bf16 rounding; on CUDA, the kernel path).

The controls show the test can fail: the same packed row with positions that run on across examples (what a collator
without per-example position ids would give), or with the example boundaries left out (what an attention that ignores
them would compute), changes the losses of every example after the first.
"""

import json

import pytest
import torch

from job import attention, data
from job.settings import ColumnSettings
from job.stages import sft

from conftest import DEMO_DATA, at_precision, tokenized

CUDA = torch.cuda.is_available()
#: Per precision: the largest per-token difference in log-probability, and the largest mean absolute difference over
#: an example. bf16: measured on the CPU 4e-3 and 1.2e-3 at most; the controls move an example by 3e-2 (mean) or more.
TOLERANCE = {"fp32": (1e-5, 1e-5), "nf4-bf16": (3e-2, 6e-3)}
CONTROL_MEAN_DIFF = 1.5e-2  # every later example moves at least this much (mean abs) in a control: 2.5x the bf16 bound


def _records():
    # The demo's QA records plus longer ones, so that rows hold examples of very different lengths.
    rows = [json.loads(line) for line in (DEMO_DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows += [{"text": r["text"] * 3, "output": r["output"] * 4} for r in rows[:6]]
    return [data._sft_record(r, *data._sft_format(set(r), ColumnSettings()), "test") for r in rows]


@pytest.fixture(scope="module", params=["fp32", "nf4-bf16"])
def packed(request, tiny_model, tmp_path_factory):
    precision = request.param
    tmp = tmp_path_factory.mktemp("packing")
    s, tok, model = at_precision(tiny_model, tmp, "sft", precision, JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="4",
                                 JOB_TRAIN__MAX_LENGTH="160")
    assert s.train.packing, "packing is the default"
    # The attention the job uses; on a CUDA GPU of this project that is the variable-length kernel, never a fallback.
    assert model.config._attn_implementation == attention.NAME
    assert not CUDA or attention.kernel_available("cuda")
    # Without a KV cache: with one, transformers' sdpa does not look for packed sequences and attention crosses examples.
    assert model.config.use_cache is False
    trainer = sft.build_trainer(s, model, tok, tokenized(tok, "sft", _records(), 160), None, tmp / "ck", [], progress_bar=False)
    batch = next(iter(trainer.get_train_dataloader()))  # exactly what the trainer feeds the model
    m = trainer.model
    device = next(m.parameters()).device
    assert device.type == ("cuda" if CUDA else "cpu")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    m.eval()  # LoRA dropout off: both forwards must be deterministic
    with torch.no_grad():  # a LoRA that does something (a fresh one has B = 0)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return precision, m, batch


def _segments(position_ids):
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.numel()]))


def _token_logps(model, input_ids, **inputs):
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits.float()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, input_ids[0, 1:, None])[:, 0]  # logp of token t+1


def _per_example(model, batch, **packed_inputs):
    """Per example: (log-probs of its trained tokens from the packed forward, the same from the example alone)."""
    ids, labels = batch["input_ids"], batch["labels"]
    packed_lp = _token_logps(model, ids, **packed_inputs)
    out = []
    for a, b in _segments(batch["position_ids"][0]):
        trained = labels[0, a + 1 : b] != -100  # labels of tokens a+1..b-1, predicted from positions a..b-2
        alone_lp = _token_logps(model, ids[:, a:b], position_ids=torch.arange(b - a, device=ids.device)[None])
        out.append((packed_lp[a : b - 1][trained], alone_lp[trained]))
    return out


def _as_trained(batch):
    """The model inputs as the trainer passes them: position ids and the collator's example boundaries."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}


def test_packed_batch_is_padding_free_with_restarting_positions(packed):
    _, _, batch = packed
    pos = batch["position_ids"][0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat row, no padding
    segs = _segments(pos)
    assert len(segs) >= 3, "the row should hold several examples"
    assert batch["cu_seq_lens_q"].tolist() == [a for a, _ in segs] + [pos.numel()]  # the boundaries attention uses
    for a, b in segs:
        assert pos[a:b].tolist() == list(range(b - a))
        assert (batch["labels"][0, a] == -100).item()  # no example learns from the one before it


def test_packed_losses_equal_unpacked(packed, monkeypatch):
    precision, model, batch = packed
    token_tol, mean_tol = TOLERANCE[precision]
    calls = _count_kernel_calls(monkeypatch)
    per_example = _per_example(model, batch, **_as_trained(batch))
    if CUDA and precision == "nf4-bf16":
        assert calls, "packed rows did not reach the variable-length kernel"
    for packed_lp, alone_lp in per_example:
        assert packed_lp.numel() > 0
        torch.testing.assert_close(packed_lp, alone_lp, atol=token_tol, rtol=0)
        assert (packed_lp - alone_lp).abs().mean().item() < mean_tol
        assert abs(packed_lp.mean().item() - alone_lp.mean().item()) < mean_tol  # the example's loss
    # And the trainer's loss on the packed batch is the token-weighted mean of the unpacked examples' losses.
    all_alone = torch.cat([a for _, a in per_example])
    with torch.no_grad():
        out = model(**batch)
    assert abs(out.loss.item() - (-all_alone.mean().item())) < max(1e-4, mean_tol)


def test_control_positions_running_on_change_the_losses(packed):
    """If positions did not restart per example, the packed row would be one long sequence and attention would
    cross examples: the check above must then fail for every example but the first."""
    precision, model, batch = packed
    running = torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device)[None]
    _assert_only_first_example_unchanged(precision, _per_example(model, batch, position_ids=running))


def test_control_boundaries_left_out_change_the_losses(packed):
    """Positions restart but attention is told the row is one sequence (an attention that ignored the collator's
    boundaries): every example after the first attends to the ones before it, and the check above must fail."""
    precision, model, batch = packed
    n = batch["input_ids"].shape[1]
    one = torch.tensor([0, n], dtype=torch.int32, device=batch["input_ids"].device)
    wrong = {**_as_trained(batch), "cu_seq_lens_q": one, "cu_seq_lens_k": one, "max_length_q": n, "max_length_k": n}
    _assert_only_first_example_unchanged(precision, _per_example(model, batch, **wrong))


def _assert_only_first_example_unchanged(precision, per_example):
    diffs = [(p - a).abs().mean().item() for p, a in per_example]
    assert diffs[0] < TOLERANCE[precision][1]
    assert all(d > CONTROL_MEAN_DIFF for d in diffs[1:]), diffs


def _count_kernel_calls(monkeypatch) -> list:
    """Record each call of the variable-length kernel (CUDA only; the CPU never reaches it)."""
    calls: list = []
    kernel = attention._varlen_kernel()
    if kernel is not None:
        fn, params = kernel

        def spy(*a, **kw):
            calls.append(a[0].shape)
            return fn(*a, **kw)

        monkeypatch.setattr(attention, "_varlen_kernel", lambda: (spy, params))
    return calls

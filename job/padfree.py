"""DPO without padding: each micro-batch's chosen and rejected rows run through the model as one flat row.

TRL 1.16's DPOTrainer pads every micro-batch to its longest row (its own `padding_free` is switched off: "temporarily
unavailable after a refactor"). The job's DPO rows are 55-70% real tokens after length sorting (docs/benchmarks.md,
lever 17), so a third or more of every DPO forward and backward was spent on padding. With JOB_TRAIN__PACKING (the
default), the job instead joins a micro-batch's rows into one row without padding, whose positions restart at each row;
the attention (job/attention.py) keeps each row to itself through the row boundaries, as for packed SFT rows.

Two pieces, which job/stages/common.py installs together for DPO with packing on:

* `Collator` wraps TRL's preference collator: the padded batch as TRL builds it, plus `job_padfree`, the flat layout
  computed on the CPU (which padded positions hold real tokens, the restarting positions, the row boundaries and the
  longest row), so that the GPU never waits for a host sync to learn them;
* `install` wraps the policy model's forward (TRL's fused LM head, which returns per-token log-probabilities): a call
  that carries `job_padfree` runs on the flat row, with each row's labels shifted within the row, and the per-token
  outputs are put back in the padded layout, zeros at the padding, as the padded call gives them. Everything of TRL's
  loss (the DPO variants, reference log-probs, metrics) then runs unchanged on the same values.

The reference forward (the adapter disabled, or TRL's frozen "ref" copy of JOB_ADAPTER) goes through the same model
and so through the same flat row. Per-row log-probabilities equal the padded ones within the attention kernel's
rounding: tests/test_padfree.py compares the two, on the CPU exactly (fp32) and on CUDA in bf16.
"""

from __future__ import annotations

import functools

import torch

#: The batch key of the flat layout; TRL passes every key it does not know on to the model's forward.
KEY = "job_padfree"


def flat_layout(attention_mask: torch.Tensor) -> dict:
    """The flat row of a right-padded batch (rows, length), computed on the CPU: `index` of each real token in the
    padded batch seen as one long row, `position_ids` (1, tokens) restarting at each row, `cu_seq_lens` (rows + 1,
    int32) and `max_length`."""
    rows, length = attention_mask.shape
    lengths = attention_mask.sum(dim=1)
    real = torch.arange(length)[None, :] < lengths[:, None]  # right padding: the real tokens come first in each row
    if not torch.equal(real, attention_mask.bool()):
        raise ValueError("padding-free DPO expects right-padded rows (TRL's preference collator pads on the right)")
    index = real.view(-1).nonzero().view(-1)
    cu = torch.zeros(rows + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return {"index": index, "position_ids": (index % length)[None, :], "cu_seq_lens": cu,
            "max_length": int(lengths.max()) if rows else 0}


class Collator:
    """TRL's preference collator, plus the flat layout of the batch it returns (under KEY)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[KEY] = flat_layout(batch["attention_mask"])
        return batch


def _unflatten(value, index: torch.Tensor, shape: tuple[int, int]):
    """A per-token output of the flat row (1, tokens) in the padded layout (rows, length - 1): position j of a row
    scores its token j + 1, as the padded call's outputs do; padding gets zeros."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == index.numel()):
        return value
    rows, length = shape
    padded = value.new_zeros(rows * length).index_copy(0, index, value[0])
    return padded.view(rows, length)[:, :-1]


def _flat_forward(forward, layout: dict, input_ids, attention_mask, labels, kwargs):
    rows, length = input_ids.shape
    index = layout["index"]
    # Each row's labels shifted within the row (the last token of a row predicts nothing), so that no row's last
    # position is scored against the next row's first token.
    shifted = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)
    out = forward(input_ids=input_ids.reshape(-1)[index][None, :], position_ids=layout["position_ids"],
                  attention_mask=None, shift_labels=shifted.reshape(-1)[index][None, :], fused_lm_head=True,
                  cu_seq_lens_q=layout["cu_seq_lens"], cu_seq_lens_k=layout["cu_seq_lens"],
                  max_length_q=layout["max_length"], max_length_k=layout["max_length"], **kwargs)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
        if getattr(out, name, None) is not None:
            setattr(out, name, _unflatten(getattr(out, name), index, (rows, length)))
    return out


def install(model) -> None:
    """Wrap the forward of `model` (a PeftModel's base model, or the model) so that a call with KEY runs flat.
    Idempotent. Calls without KEY (generation, the model's own loss) are passed through unchanged."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = inner.forward
    if getattr(forward, "_job_padfree", False):
        return

    @functools.wraps(forward)
    def padfree_forward(*args, **kwargs):
        layout = kwargs.pop(KEY, None)
        if layout is None:
            return forward(*args, **kwargs)
        input_ids, attention_mask, labels = (kwargs.pop(k, None) for k in ("input_ids", "attention_mask", "labels"))
        if args or not kwargs.pop("fused_lm_head", False) or labels is None or input_ids is None \
                or kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None:
            raise RuntimeError("padding-free DPO: unexpected model call (TRL's DPOTrainer changed how it calls the model)")
        return _flat_forward(forward, layout, input_ids, attention_mask, labels, kwargs)

    padfree_forward._job_padfree = True
    inner.forward = padfree_forward

"""JOB_TRAIN__OFFLOAD_CHECKPOINTS (job/offload.py): with checkpointing on a GPU, the checkpointed layers' inputs wait
for the backward in pinned CPU memory, and the gradients are exactly those of a run that kept them on the GPU. What it
saves and costs on a 13B is measured on the GPU (docs/benchmarks.md, lever 16)."""

from __future__ import annotations

import json

import pytest
from conftest import four_bit_lora_model, run_sft_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a GPU")


@cuda
@pytest.mark.parametrize("lean", [True, False], ids=["lean-lora", "peft-lora"])
def test_offloaded_checkpoints_give_the_same_gradients(tiny_model, lean):
    """Bit-identical loss and LoRA gradients with and without the offload (values only move between memories), while
    every checkpointed layer's input went to pinned CPU memory and came back once. A mix-up in the backward's
    one-ahead fetch would hand a layer another layer's input: the gradients would differ."""
    import torch

    from job import lora, offload

    model = four_bit_lora_model(tiny_model, "cuda", dropout=0.1, fp32_adapter=True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lean:
        lora.make_lean(model)
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(1)).cuda()

    def step(hooks):
        torch.manual_seed(5)
        with hooks:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            model.zero_grad()
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = step(offload.during_step(False))

    class Counting(offload.OffloadSaved):
        def __init__(self):
            self.packed, self.unpacked = [], []
            super().__init__(min_bytes=0)  # the tiny model's tensors are all small

        def _pack(self, t):
            self.packed.append(super()._pack(t))
            return self.packed[-1]

        def _unpack(self, saved):
            self.unpacked.append(saved)
            return super()._unpack(saved)

    hooks = Counting()
    loss, grads = step(hooks)
    moved = [s for s in hooks.packed if isinstance(s, offload._Saved)]
    assert len(moved) >= model.config.num_hidden_layers  # at least each layer's input
    assert all(s.host.device.type == "cpu" and s.host.is_pinned() for s in moved)
    assert sum(isinstance(s, offload._Saved) for s in hooks.unpacked) == len(moved) and hooks.order == []
    assert loss == plain_loss
    for name, g in plain.items():
        assert torch.equal(grads[name], g), name


def test_the_setting_is_used_with_checkpointing_on_a_gpu_and_said_to_do_nothing_elsewhere(tiny_model, tmp_path, caplog):
    """metrics.json says whether the offload was in effect: with checkpointing on a GPU; on a CPU the run says the
    setting has no effect there and trains as usual."""
    import logging

    import torch

    caplog.set_level(logging.INFO, logger="job")
    out = run_sft_in_process(tiny_model, tmp_path, "offload", steps=2, JOB_TRAIN__OFFLOAD_CHECKPOINTS="true",
                             JOB_TRAIN__GRADIENT_CHECKPOINTING="true")
    assert (out / "_SUCCESS").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    on_gpu = torch.cuda.is_available()
    assert metrics["gradient_checkpointing"] is True and metrics["offloaded_checkpoints"] is on_gpu
    messages = [r.getMessage() for r in caplog.records]
    said = "kept in pinned CPU memory" if on_gpu else "JOB_TRAIN__OFFLOAD_CHECKPOINTS has no effect here"
    assert any(said in m for m in messages), messages

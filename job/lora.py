"""A leaner forward for PEFT's LoRA linear layers in mixed-precision training: the same function, fewer passes over
memory, and a recompute that can stop earlier under gradient checkpointing.

PEFT 0.21's 4-bit LoRA layer (`peft.tuners.lora.bnb.Linear4bit.forward`) computes

    result = base(x).clone();  result = result + lora_B(lora_A(dropout(x))) * scaling

that is, besides the two GEMMs of the base and of B, four elementwise passes over an output-sized tensor (the clone,
the scaling, the sum) and a fifth in the backward (the scaling again), in the share of the H200 profile that was
neither GEMM nor attention. Here:

    b = linear(lora_A(dropout(x)), scaling * B)      # the scaling folded into B's r columns (tiny)
    b += x @ W.T                                     # the kept copy (job.model.keep_dequantized): the GEMM adds in place
    b += base(x)                                     # or bitsandbytes' 4-bit layer: one sum

Everything the backward needs from this layer (the dropout's mask and output, A's output) is saved before the base is
called. With checkpointing torch stops each layer's recompute once the last saved tensor is back (non-reentrant
checkpointing's early stop), so the base GEMM of a layer's last projection (the MLP's down projection, 22% of a
Llama layer's weights) is no longer recomputed, nor dequantized: bitsandbytes' matmul keeps its state outside autograd's
saved tensors. PEFT calls the base first, so that recompute ran every time.

Only under autocast (training and evaluation in bf16/fp16: what the job runs on a GPU), for one active plain LoRA
adapter, unmerged, without a LoRA bias or a variant (DoRA), and with the input already in the base's compute dtype.
Anything else (inference without autocast, adapters disabled for DPO's reference, mixed adapter batches) goes
through PEFT's own forward, unchanged. The dropout draws the same masks in the same order as PEFT's forward, so a seeded
run sees the same randomness; tests/test_lora.py compares both forwards' losses and gradients.

Measured on an H200, 13B, against PEFT's forward in the same process (bench/NOTES.md, row 15): SFT +5.2% (8,730 vs
8,297 tokens/s), with checkpointing +5.5%, DPO +4.1% without the dequantized copy and +0.3% with it."""

from __future__ import annotations

import types

import torch

#: The trainer's LoRA layers get the lean forward (job.stages.common.make_trainer); the bench's `_peft_lora` switch
#: turns it off to measure what it buys.
LEAN = True


def lora_layers(model) -> list:
    """The model's PEFT LoRA linear layers (4-bit bitsandbytes bases and plain ones)."""
    from peft.tuners.lora import Linear

    classes: tuple = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes absent
        pass
    else:
        classes += (Linear4bit,)
    return [m for m in model.modules() if isinstance(m, classes)]


def make_lean(model) -> int:
    """Give every LoRA linear layer of `model` the lean forward (once); returns how many layers got it."""
    n = 0
    for layer in lora_layers(model):
        if "forward" not in layer.__dict__:
            layer.forward = types.MethodType(_lean_forward, layer)
            n += 1
    return n


def undo(model) -> int:
    """Every LoRA layer back to PEFT's forward; returns how many were lean."""
    return sum(layer.__dict__.pop("forward", None) is not None for layer in lora_layers(model))


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or not torch.is_autocast_enabled(x.device.type)):
        return peft_forward(self, x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return peft_forward(self, x, *args, **kwargs)
    base = self.base_layer
    kept = base._buffers.get("_dequantized")
    compute = kept.dtype if kept is not None else getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype != compute or x.dtype != torch.get_autocast_dtype(x.device.type):
        return peft_forward(self, x, *args, **kwargs)

    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a = self.lora_A[name](self.lora_dropout[name](x2))
    b = torch.nn.functional.linear(a, self.lora_B[name].weight * self.scaling[name])  # autocast: in x's dtype
    if kept is not None and base.bias is None:
        b.addmm_(x2, kept.t())  # in-place ops don't autocast: all three are in the compute dtype here
    else:
        b.add_(base(x2))
    return b.view(*shape, b.shape[-1])

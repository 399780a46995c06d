"""Speed levers measured by the benchmark before they are wired into the job (bench.py's variants apply them to the
job's own trainer; bench/NOTES.md has each one's prediction and measurement).

`dequantize_once`: the H200 profile of the job's 13B SFT step spent 4% of the time dequantizing the NF4 base weights,
which bitsandbytes does again in every forward and every backward of every projection. Where the GPU has the room
(a 13B base is 24 GiB in bf16; the H200 has 141), keeping one bf16 copy of each dequantized weight removes that
work and computes the same products: the copy is exactly what bitsandbytes dequantizes to on each call. The 4-bit
weights stay (adapters are saved and merged against them); the copies are buffers that are never saved.

    from levers import dequantize_once
    dequantize_once(trainer.model)        # returns the bytes added
"""

from __future__ import annotations

import types

import torch


def dequantize_once(model) -> int:
    """Replace each bitsandbytes 4-bit linear layer's per-call dequantization by a kept bf16 (compute dtype) copy."""
    import bitsandbytes as bnb

    added = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "_dequantized"):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            weight = weight.to(module.compute_dtype or weight.dtype)
            module.register_buffer("_dequantized", weight, persistent=False)
            module.forward = types.MethodType(_forward_dequantized, module)
            added += weight.numel() * weight.element_size()
    return added


def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward with the kept weight: input in the compute dtype, output in the input's."""
    w = self._dequantized
    bias = None if self.bias is None else self.bias.to(w.dtype)
    return torch.nn.functional.linear(x.to(w.dtype), w, bias).to(x.dtype)

"""Attention for packed rows: each example of a packed row attends to itself only, through variable-length attention,
registered with transformers' `AttentionInterface` as "packed_varlen".

Why: packing is the default, and TRL's padding-free collator turns a micro-batch into one flat row of several examples
whose positions restart at each example. transformers' `sdpa` runs such a row as masked SDPA over the whole row
(~4k tokens) with a dense block-diagonal causal mask: most of that work falls on the blocks between examples, which are
masked out, and cuDNN builds a new execution plan for each new row length. Measured on an H200 (13B SFT, torch 2.11):
attention was 26% of a step, and ~50 ms idle gaps came before the first cuDNN attention call of half the micro-batches;
variable-length flash attention over a 4,082-token row of 8 examples, 40 heads x 128, forward + backward, took 1.41 ms
against 4.8 ms for SDPA with the block mask, equal within bf16 rounding.

The collator already computed each example's boundaries on the CPU (`cu_seq_lens_q`, `max_length_q`, passed down to
every attention call with the batch; for DPO, job/padfree.py does the same with a micro-batch's rows), so the kernel
needs no mask and nothing derived on the GPU (transformers still builds sdpa's mask once per forward, for the paths
below that use it):

* packed rows (`cu_seq_lens_q` given, one row, no KV cache) on CUDA in bf16/fp16 with flash attention available:
  `torch.nn.attention.varlen.varlen_attn`, causal within each example, and within the model's sliding window where
  the layer has one (Mistral, Phi-3, Starcoder2 pass it as `sliding_window=` on each call; Qwen2/3 and Gemma set it
  per layer);
* packed rows anywhere else (CPU, fp32): the same boundaries and window, one SDPA per example (exact, slower);
* everything else (unpacked or padded batches, DPO with JOB_TRAIN__PACKING=false, generation with a KV cache,
  dropout, bidirectional use): transformers' own `sdpa`, with the mask transformers
  builds for it (the mask function registered for this name is `sdpa`'s), so the results there are `sdpa`'s. On CUDA
  that path leaves out cuDNN's SDPA backend, whose plan for each new shape stalls the GPU when micro-batches keep
  changing length (padded DPO batches); whether that pays is measured by the benchmark's `cudnn` variant
  (docs/benchmarks.md, lever 3).

Models this can't serve never get it: job/fastpaths.py loads soft-capping models (Gemma-2) with transformers' `eager`
and refuses packed rows for models that compute attention in their own code (Bloom, Falcon, MPT).

    >>> from job import attention
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.choose("cuda:0"))
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

log = logging.getLogger(__name__)

NAME = "packed_varlen"

#: The masked path on CUDA leaves cuDNN out of SDPA's choice (its plan for each new sequence length preceded ~50 ms
#: gaps in the H200 profile); False gives PyTorch's own choice back (the benchmark's `cudnn` variant).
AVOID_CUDNN = True
_NO_CUDNN: list | None = None  # the backends, built on first use


@functools.cache
def _varlen_kernel():
    """torch's variable-length flash attention and the keywords this torch version takes, or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, frozenset(params)


def kernel_available(device: str | torch.device) -> bool:
    """Whether packed rows on this device go through the flash varlen kernel (CUDA, compute capability 8.0+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or _varlen_kernel() is None:
        return False
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)():  # builds without flash
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose(device: str | torch.device) -> str:
    """The attention implementation to load a model with on `device`: this module's (registered here) wherever its
    packed path runs well, else "sdpa". On a CUDA GPU without the kernel (torch < 2.10, pre-Ampere) the per-example
    fallback would cost a host sync per layer, which is worse than sdpa's dense mask."""
    device = torch.device(device)
    if device.type == "cuda" and not kernel_available(device):
        log.info("attention: sdpa (no variable-length flash attention for %s in torch %s)", device, torch.__version__)
        return "sdpa"
    register()
    return NAME


def register() -> None:
    """Make NAME a valid `attn_implementation` for transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _is_packed_call(module, query, key, dropout, kwargs) -> bool:
    """A packed training row whose example boundaries the collator gave, and nothing varlen can't express."""
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        return False
    if query.shape[2] != key.shape[2]:  # a KV cache: generation, not a packed row
        return False
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return False
    return kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False


def window(module, kwargs) -> int | None:
    """The layer's sliding window in tokens (a query sees itself and the window - 1 tokens before it), or None.
    Mistral, Phi-3, Mixtral and Starcoder2 pass it on each call; Qwen2/3 and Gemma keep it on the layer (None on
    their full-attention layers, which pass None on the call too)."""
    if "sliding_window" in kwargs:
        return kwargs["sliding_window"]
    return getattr(module, "sliding_window", None)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention signature: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim);
    returns ((batch, seq, heads, dim), None)."""
    if not _is_packed_call(module, query, key, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # Self-attention without a cache: the key boundaries are the query boundaries (the collator gives the same list
    # twice; comparing the two device copies would cost a host sync per layer).
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (seq, heads, dim): a view, no copy
    out = varlen_causal(q, k, v, kwargs["cu_seq_lens_q"], kwargs.get("max_length_q"), scaling, window(module, kwargs))
    return out.unsqueeze(0), None


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, max_len: int | None,
                  scale: float | None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention within each segment [cu[i], cu[i+1]) of a flat row, each query seeing at most the last
    `sliding_window` tokens (itself included) when given: q (tokens, heads, dim), k/v (tokens, kv_heads, dim) ->
    (tokens, heads, dim). Flash varlen on CUDA in half precision; one SDPA per segment otherwise."""
    kernel = _varlen_kernel()
    flash_shape = q.shape[-1] % 8 == 0 and q.shape[-1] <= 256  # head sizes the flash kernel has
    if q.is_cuda and kernel is not None and q.dtype in (torch.bfloat16, torch.float16) and flash_shape:
        fn, params = kernel
        if max_len is None:
            max_len = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
        cu = cu_seq_lens.to(device=q.device, dtype=torch.int32, non_blocking=True)
        extra = {}
        if "window_size" in params:
            # causal; flash's window counts the tokens before the query, transformers' window includes the query
            extra["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
        elif sliding_window:
            raise RuntimeError("this torch's varlen_attn takes no window, and the model has a sliding window")
        else:
            extra["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        if scale is not None and "scale" in params:
            extra["scale"] = scale
        elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise RuntimeError(f"this torch's varlen_attn takes no scale, and the model's ({scale}) is not the default")
        return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, int(max_len), int(max_len), **extra)
    # Exact fallback: the same segments, each through causal SDPA (heads first, as SDPA wants them).
    bounds = cu_seq_lens.tolist()
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            mask = None
            if sliding_window and b - a > sliding_window:  # causal and within the window: kv in (q - window, q]
                i = torch.arange(b - a, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            seg = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), attn_mask=mask,
                is_causal=mask is None, scale=scale)
            out[a:b] = seg.transpose(0, 1)
    if bounds[-1] < q.shape[0]:  # tokens past the last boundary belong to no example: give them zeros, not garbage
        out[bounds[-1]:] = 0
    return out


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (query.is_cuda and AVOID_CUDNN):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global _NO_CUDNN
    if _NO_CUDNN is None:
        _NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(_NO_CUDNN):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

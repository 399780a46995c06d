"""Greedy answers for the before/after generations (job/evaluate.py): a static KV cache, and on a GPU each new token's
forward pass replayed from a CUDA graph captured once per batch.

Why: transformers' `generate` runs the decoder eagerly, so a new token costs one Python dispatch and one kernel launch
per operation: for 8 prompts on the 13B model, ~48 ms per token on an H200 whose weights are read in ~6 ms, and the
"before" answers of the seed's SFT (8 prompts x 256 tokens, a base model that does not stop) took 12-17 s of a 150-s
goal (docs/benchmarks.md, lever 13). transformers' own remedy (a static cache with `torch.compile`) compiles the decoder
first, which costs more than these few hundred tokens save. A CUDA graph needs no compiler: the forward pass of one
token is recorded once (the kernels and their arguments) and replayed, with the positions, the mask and the cache's
write position kept in GPU tensors that the replay itself advances.

The answers are the ones `generate` gives (tests/test_decode.py compares them token for token): the same
greedy choice, the same positions for left-padded prompts (`cumsum(mask) - 1`), each token attending to its own
prompt's tokens and answer so far. Models this path does not cover (a cache that is not one full-attention layer
type throughout, a forward without `cache` and `logits_to_keep`) get transformers' `generate`. A step that cannot be
captured as a graph (an operation that waits for the host, say) is logged, and the loop goes on eagerly.

    >>> new = greedy(model, input_ids, attention_mask, max_new_tokens=256, eos=[2], deadline=time.monotonic() + 300)
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

import torch

log = logging.getLogger(__name__)

#: Host syncs (all answers done? time left?) happen every this many tokens: each costs a GPU round trip.
CHECK_EVERY = 16
#: Eager steps before a capture (cuBLAS handles, Triton kernels and the cache are set up by then), and the fewest
#: tokens left for which a capture pays.
WARMUP_STEPS = 2
MIN_GRAPH_TOKENS = 8


def unsupported(model) -> str | None:
    """Why `greedy` can't answer for this model (then use `generate`), or None."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only model"
    try:
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception as exc:  # a config transformers' static cache does not describe
        return f"no static cache for this config ({type(exc).__name__})"
    if set(types) != {"full_attention"}:
        return f"attention layers of types {sorted(set(types))}"
    params = _forward_params(type(base))
    if not {"cache", "logits_to_keep", "position_ids", "attention_mask"} <= params:
        return "its forward takes no `cache`/`logits_to_keep`"
    return None


def _causal_lm(model):
    """The transformers model under a PEFT wrapper (whose forward passes the same keywords through)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos: list[int],
           deadline: float, graph: bool | None = None) -> torch.Tensor:
    """New tokens (batch, n) for left-padded prompts, greedy, n <= max_new_tokens: fewer when every row has produced
    an EOS id or the deadline (time.monotonic()) passed first. Rows go on past their EOS (the caller cuts there).
    `graph=False`: no CUDA graph (by default one is replayed on CUDA; never elsewhere)."""
    from transformers.cache_utils import StaticCache

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    graph = device.type == "cuda" and graph is not False
    config = _causal_lm(model).config
    cache = StaticCache(config=config, max_cache_len=total)
    eos_t = torch.tensor(eos, device=device)

    # Prefill: each prompt token attends to its own prompt's earlier tokens; a padding position attends to itself only
    # (a row with no key at all would give NaN, which reaches real tokens through the values even with weight 0).
    real = attention_mask.bool()
    keys = torch.zeros(batch, total, dtype=torch.bool, device=device)  # which cache positions hold a real token
    keys[:, :prompt_len] = real
    q, k = torch.arange(prompt_len, device=device)[:, None], torch.arange(total, device=device)[None, :]
    mask = ((k <= q) & keys[:, None, :]) | ((k == q) & ~real[:, :, None])
    positions = real.long().cumsum(-1) - 1
    positions.masked_fill_(~real, 1)  # as generate() does; padding positions are never attended to
    logits = model(input_ids=input_ids, attention_mask=mask[:, None], position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits
    first = logits[:, -1].argmax(-1)

    # Decode: every tensor a step reads or advances lives on the device, so that a replay advances it too.
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = first
    token = first[:, None].clone()
    position = positions[:, -1:] + 1  # the last prompt token is real (left padding)
    column = torch.tensor([prompt_len], device=device)  # the cache position the fed token is written to
    produced = torch.tensor([1], device=device)  # tokens in `out`
    done = torch.isin(first, eos_t)
    mask = keys[:, None, None, :]  # a view: the step writes `keys`

    def step():
        keys.index_fill_(1, column, True)  # the fed token's own key
        nxt = model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1].argmax(-1)
        out.index_copy_(1, produced, nxt[:, None])
        done.logical_or_(torch.isin(nxt, eos_t))
        token.copy_(nxt[:, None])
        for t in (position, column, produced):
            t.add_(1)

    # The graph: warm-up steps on a side stream (as torch.cuda.graphs asks), then one step recorded, not run.
    graph = graph and max_new_tokens - 1 >= WARMUP_STEPS + MIN_GRAPH_TOKENS
    stream = side = side_stream(device) if graph else None  # `side`: the warm-up is still going on
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    n, replay = 1, None
    while n < max_new_tokens:
        if n % CHECK_EVERY == 0 and (bool(done.all()) or time.monotonic() >= deadline):
            break
        if side is not None and n == 1 + WARMUP_STEPS:
            torch.cuda.current_stream(device).wait_stream(side)
            side, replay = None, _capture(step, stream)
        if replay is not None:
            replay.replay()
        elif side is not None:
            with torch.cuda.stream(side):
                step()
        else:
            step()
        n += 1
    if graph:
        torch.cuda.synchronize(device)
    return out[:, :n]


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for the whole process: the decode loop's warm-up steps and capture, and
    job/offload.py's copies. cuBLAS keeps a workspace for each stream it has run on (32 MiB on an H200, measured:
    tests/test_dequantized.py's memory check), so a new stream for each batch would leave one more behind each time."""
    return torch.cuda.Stream(device)


def _capture(step, stream: torch.cuda.Stream):
    """A CUDA graph of `step` (capture records its kernels, it does not run them), or None when it can't be
    captured."""
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            step()
        return g
    except Exception as exc:  # an operation that syncs with the host, say: go on eagerly
        log.warning("generation: one token's forward pass could not be captured as a CUDA graph (%s: %s); "
                    "answering without it", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return None

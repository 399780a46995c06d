"""job/attention.py: packed rows attend within each example only, forward and backward, on every device the job runs
on (the CPU's per-example fallback; on a CUDA GPU the variable-length flash kernel), and everything that is not a
packed row behaves exactly as transformers' sdpa.

The reference is SDPA over the whole row with a dense block-diagonal causal mask (what `sdpa` computes for a packed
row), in float64 on the CPU. The control: the same reference without the example boundaries (plain causal attention
over the row) is far from the output, so a kernel that ignored the boundaries could not pass.
"""

import pytest
import torch

from job import attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: ||out - ref|| / ||ref||: float64 fallback on the CPU vs a float64 reference; bf16 kernel vs the float64 reference
#: (bf16 operands land between 1e-3 and 1e-2).
REL_TOL = {"cpu": 1e-10, "cuda": 2e-2}


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _reference(q, k, v, cu, scale, boundaries=True):
    """Dense masked SDPA over the whole row, float64, (tokens, heads, dim) in and out."""
    n = q.shape[0]
    seg = torch.zeros(n, dtype=torch.long)
    for b in cu[1:-1]:
        seg[b:] += 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal & (seg[:, None] == seg[None, :]) if boundaries else causal
    rep = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask[None], scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query
def test_varlen_equals_block_masked_attention_forward_and_backward(device, kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    lengths = [37, 1, 128, 3, 200, 64]  # a one-token example, short and long ones, as packing makes them
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    tokens, heads, dim, scale = cu[-1], 4, 64, 0.125
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    base = [torch.randn(tokens, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(tokens, heads, dim, generator=g, dtype=torch.float64)

    # The job's path, in the job's precision on this device
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in base)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    out = attention.varlen_causal(q, k, v, cu_t, max(lengths), scale)
    out.backward(grad_out.to(device=device, dtype=dtype))

    # The reference, from the same (rounded) inputs
    rq, rk, rv = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = _reference(rq, rk, rv, cu, scale)
    ref.backward(grad_out)

    assert out.shape == (tokens, heads, dim) and torch.isfinite(out).all()
    tol = REL_TOL[device]
    assert _rel(out.detach().cpu(), ref.detach()) < tol
    for mine, theirs in ((q, rq), (k, rk), (v, rv)):
        assert _rel(mine.grad.cpu(), theirs.grad) < tol
    # Control: attention across the examples (the boundaries left out) is nowhere near
    crossing = _reference(rq.detach(), rk.detach(), rv.detach(), cu, scale, boundaries=False)
    assert _rel(out.detach().cpu(), crossing) > 10 * max(tol, 1e-3)


def test_choose_registers_the_packed_attention_where_it_runs(tiny_model):
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert attention.choose("cpu") == attention.NAME
    assert attention.NAME in ALL_ATTENTION_FUNCTIONS and attention.NAME in ALL_MASK_ATTENTION_FUNCTIONS
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention.choose("cpu"))
    assert model.config._attn_implementation == attention.NAME
    if torch.cuda.is_available():
        expected = attention.NAME if torch.cuda.get_device_capability() >= (8, 0) else "sdpa"
        assert attention.choose("cuda") == expected


@pytest.mark.parametrize("device", DEVICES)
def test_everything_but_packed_rows_is_sdpa(tiny_model, device):
    """Padded batches (unpacked SFT, DPO, evaluation) and generation with a KV cache give what sdpa gives."""
    from transformers import AutoModelForCausalLM

    mine, sdpa = (AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl, dtype=torch.float32).to(device).eval()
                  for impl in (attention.choose(device if device == "cpu" else "cuda"), "sdpa"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 40), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # right padding, as TRL pads
    mask[2, 33:] = 0
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)

    prompt = ids[:2, :12]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out_mine = mine.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)
        out_sdpa = sdpa.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)
    assert out_mine.tolist() == out_sdpa.tolist()

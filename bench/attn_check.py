"""On a CUDA GPU, before any timing: the job's attention for packed rows (job/attention.py) at the 13B shape.

1. Correct: a packed row of 8 examples (4,082 tokens, 40 heads x 128, bf16) through the job's path equals SDPA with
   the dense block-diagonal causal mask (what `sdpa` computes), forward and all three gradients, both measured
   against a float32 reference (||x - ref|| / ||ref||; bf16 operands land between 1e-3 and 1e-2). Control: plain
   causal attention over the whole row (the boundaries left out) is far from the reference.
2. Fast: forward + backward of each (median of CUDA-event timings after warm-up), for SDPA with PyTorch's backend
   choice and with cuDNN excluded.
3. A new row length: the first call at each of several new lengths against the steady time (cuDNN builds a plan per
   new shape; the H200 profile showed ~50 ms gaps before the first cuDNN attention call of half the micro-batches).

    python bench/attn_check.py [--out attn.json]       # exit 1 if a check fails
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job import attention  # noqa: E402

LENGTHS = [612, 401, 350, 745, 298, 530, 666, 480]  # 4,082 tokens, lognormal-like around the data's median
HEADS, DIM = 40, 128
TOL = 1e-2


def block_mask(cu: list[int], n: int, device) -> torch.Tensor:
    seg = torch.zeros(n, dtype=torch.long, device=device)
    for b in cu[1:-1]:
        seg[b:] += 1
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal & (seg[:, None] == seg[None, :])


def sdpa_dense(q, k, v, mask, scale, backends=None):
    """SDPA over the row with a dense mask, (tokens, heads, dim) in and out, as transformers' sdpa calls it."""
    from torch.nn.attention import sdpa_kernel

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                               v.transpose(0, 1)[None], attn_mask=mask[None, None], scale=scale)
        return out[0].transpose(0, 1)

    if backends is None:
        return run()
    with sdpa_kernel(backends):
        return run()


def rel(x, ref) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def fwd_bwd(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), [t.grad for t in (q, k, v)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, q, k, v, grad, reps=20, warmup=3) -> float:
    """Median forward + backward in ms (host clock around a device sync: each call is milliseconds long)."""
    for _ in range(warmup):
        fwd_bwd(fn, q, k, v, grad)
    times = []
    for _ in range(reps):
        sync(q.device)
        t0 = time.perf_counter()
        fwd_bwd(fn, q, k, v, grad)
        sync(q.device)
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script at a small size (no kernel)")
    a = p.parse_args(argv)
    from torch.nn.attention import SDPBackend

    dev = torch.device(a.device)
    global LENGTHS, HEADS
    if dev.type == "cpu":
        LENGTHS, HEADS = [x // 8 for x in LENGTHS], 2
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                 "kernel_available": attention.kernel_available(dev), "choose": attention.choose(dev), "lengths": LENGTHS}
    kernel = attention._varlen_kernel()
    res["varlen_params"] = sorted(kernel[1]) if kernel else None
    g = torch.Generator(device=dev).manual_seed(0)
    n, scale = sum(LENGTHS), DIM ** -0.5
    cu = [0]
    for x in LENGTHS:
        cu.append(cu[-1] + x)
    q, k, v, grad = (torch.randn(n, HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    mask = block_mask(cu, n, dev)
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    paths = {
        "job_varlen": lambda q, k, v: attention.varlen_causal(q, k, v, cu_t, max(LENGTHS), scale),
        "sdpa_dense_mask": lambda q, k, v: sdpa_dense(q, k, v, mask, scale),
        "sdpa_dense_mask_no_cudnn": lambda q, k, v: sdpa_dense(q, k, v, mask, scale, no_cudnn),
    }

    # 1. correctness against a float32 reference
    ref_out, ref_grads = fwd_bwd(lambda q, k, v: sdpa_dense(q, k, v, mask, scale, [SDPBackend.MATH]),
                                 *(t.float() for t in (q, k, v)), grad.float())
    ok = True
    for name, fn in paths.items():
        out, grads = fwd_bwd(fn, q, k, v, grad)
        errs = {"out": rel(out, ref_out), **{f"d{c}": rel(gr, rg) for c, gr, rg in zip("qkv", grads, ref_grads)}}
        good = all(e < TOL for e in errs.values()) and bool(torch.isfinite(out).all())
        ok &= good
        res[f"rel_err_{name}"] = {k_: round(e, 5) for k_, e in errs.items()}
        print(json.dumps({"check": f"correct {name}", "ok": good, **errs}), flush=True)
    crossing = sdpa_dense(q.float(), k.float(), v.float(), torch.ones(n, n, dtype=torch.bool, device=dev).tril(), scale)
    res["rel_err_control_boundaries_left_out"] = round(rel(crossing, ref_out), 4)
    ok &= res["rel_err_control_boundaries_left_out"] > 10 * TOL
    print(json.dumps({"check": "control", "rel_err": res["rel_err_control_boundaries_left_out"]}), flush=True)

    # 2. forward + backward time
    for name, fn in paths.items():
        res[f"ms_{name}"] = round(timed(fn, q, k, v, grad), 3)
    print(json.dumps({"check": "time (fwd+bwd, ms)", **{k_: v_ for k_, v_ in res.items() if k_.startswith("ms_")}}), flush=True)

    # 3. the first call at a new row length
    first = {}
    for name, fn in paths.items():
        cost = []
        for extra in (3, 7, 11, 13):
            m = n + extra
            qq, kk, vv, gg = (torch.randn(m, HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
            c2 = cu[:-1] + [m]
            c2_t = torch.tensor(c2, dtype=torch.int32, device=dev)
            mk = block_mask(c2, m, dev)
            f = {"job_varlen": lambda q, k, v: attention.varlen_causal(q, k, v, c2_t, max(LENGTHS) + extra, scale),
                 "sdpa_dense_mask": lambda q, k, v: sdpa_dense(q, k, v, mk, scale),
                 "sdpa_dense_mask_no_cudnn": lambda q, k, v: sdpa_dense(q, k, v, mk, scale, no_cudnn)}[name]
            sync(dev)
            t0 = time.perf_counter()
            fwd_bwd(f, qq, kk, vv, gg)
            sync(dev)
            cost.append(round(1000 * (time.perf_counter() - t0), 2))
        first[name] = cost
    res["first_call_ms_at_new_lengths"] = first
    print(json.dumps({"check": "first call at 4 new lengths (ms, host-timed)", **first}), flush=True)
    res["ok"] = ok
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({"check": "attention", "ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

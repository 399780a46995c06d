"""Check a GPU machine before benchmarking: versions, what the job needs from transformers/TRL, CUDA, bitsandbytes
4-bit on the GPU, Liger, SDPA on packed rows, and the two ceilings (bf16 matmul rate, copy bandwidth).

    python bench/envcheck.py            # prints one JSON object per check
    python bench/envcheck.py --quick    # versions and API checks only (no GPU work)
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib import metadata


def check(name, fn):
    try:
        out = fn()
        print(json.dumps({"check": name, "ok": True, **(out or {})}), flush=True)
    except Exception as exc:  # report and go on
        print(json.dumps({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "trace": traceback.format_exc()[-1500:]}), flush=True)


def versions():
    out = {}
    for n in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "liger-kernel", "triton",
              "huggingface-hub", "tokenizers", "safetensors", "pydantic", "pydantic-settings", "numpy"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    import transformers

    out["transformers_path"] = transformers.__file__
    return out


def job_api():
    """What the job's code relies on in transformers/TRL (the mapping in job/stages/common.py)."""
    from transformers import TrainingArguments
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    need = ["activation_checkpointing", "activation_checkpointing_kwargs", "use_liger_kernel", "warmup_steps"]
    missing = [f for f in need if f not in fields]
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

    import job.pipeline  # noqa: F401
    import job.stages.dpo  # noqa: F401
    import job.stages.sft  # noqa: F401

    if missing:
        raise RuntimeError(f"TrainingArguments lacks {missing}")
    return {"training_args_fields": need}


def cuda():
    import torch

    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def bnb_4bit():
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(5120, 13824, bias=False, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(5120, 13824, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q = q.cuda()
    x = torch.randn(2048, 5120, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    y.float().pow(2).mean().backward()
    ref = x.detach() @ lin.weight.cuda().t()
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    # time the 4-bit layer (dequantize + bf16 GEMM) against the bf16 GEMM alone
    w = lin.weight.cuda()
    def t(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - a) / n
    with torch.no_grad():
        t4 = t(lambda: q(x))
        t16 = t(lambda: x @ w.t())
    flop = 2 * 2048 * 5120 * 13824
    return {"rel_err_vs_bf16_weights": round(rel, 4), "grad_finite": bool(torch.isfinite(x.grad).all()),
            "nf4_layer_ms": round(t4 * 1e3, 3), "bf16_gemm_ms": round(t16 * 1e3, 3),
            "nf4_tflops": round(flop / t4 / 1e12, 1), "bf16_tflops": round(flop / t16 / 1e12, 1)}


def liger():
    import liger_kernel
    from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    import torch

    n = LigerRMSNorm(5120).cuda().to(torch.bfloat16)
    x = torch.randn(64, 5120, device="cuda", dtype=torch.bfloat16)
    y = n(x)
    return {"path": liger_kernel.__file__, "rmsnorm_finite": bool(torch.isfinite(y).all())}


def sdpa_packed():
    """Two sequences packed in one row with restarting position ids, through transformers' own mask code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # use_cache=False as in training: with a KV cache transformers does not look for packed sequences at all
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=1024, attn_implementation="sdpa", use_cache=False)
    m = LlamaForCausalLM(cfg).cuda().to(torch.float32).eval()
    a, b = torch.randint(0, 512, (1, 37), device="cuda"), torch.randint(0, 512, (1, 50), device="cuda")
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(37), torch.arange(50)])[None].cuda()
    with torch.no_grad():
        packed = m(input_ids=row, position_ids=pos).logits
        alone = torch.cat([m(input_ids=a).logits, m(input_ids=b).logits], 1)
    return {"max_abs_diff": float((packed - alone).abs().max())}


def ceilings():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        a @ b
    e.record()
    torch.cuda.synchronize()
    mm = 2 * 8192**3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    bw = 2 * 2**30 * 10 / (s.elapsed_time(e) / 1e3) / 1e12
    return {"bf16_matmul_tflops": round(mm, 1), "copy_tb_per_s": round(bw, 2)}


if __name__ == "__main__":
    sys.path.insert(0, ".")
    check("versions", versions)
    check("job_api", job_api)
    if "--quick" not in sys.argv:
        for name, fn in (("cuda", cuda), ("bitsandbytes_nf4", bnb_4bit), ("liger", liger), ("sdpa_packed", sdpa_packed), ("ceilings", ceilings)):
            check(name, fn)

"""Memory and time of JOB_STAGE=merge at a real model size: a random-weight llm-jp-3 shape (bench/synth.py, bf16) and a
random r=16 all-linear adapter, merged by `python -m job` in a subprocess (on the CPU, as the stage always merges),
whose peak RSS is measured; then the merged model's logits are compared with base + adapter (PeftModel), both in
bf16, on the GPU when there is one.

    python bench/merge_memory.py --shape 13b --work /tmp/merge-bench --out bench/results/merge-13b.json
    python bench/merge_memory.py --shape tiny --work /tmp/merge-tiny          # a CPU check of this script

13b needs about 30 GB of disk per copy (base, merged) and, if the README's estimate holds, ~26 GB of RAM for the merge.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def build_adapter(base: Path, dest: Path, device: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dest / "adapter_model.safetensors").exists():
        return dest
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device})
    # init_lora_weights=False: B is random too, so the adapter moves the logits and a lost merge shows.
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                             task_type="CAUSAL_LM"))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    del model
    return dest


def compare(base: Path, adapter: Path, merged: Path, device: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(base).vocab_size
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": device})
        got = m(ids).logits.float()
        del m
        b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device})
        plain = b(ids).logits.float()
        ref = PeftModel.from_pretrained(b, adapter)(ids).logits.float()
    scale = ref.abs().max().item()
    return {"max_abs_diff": (got - ref).abs().max().item(), "logit_scale": scale,
            "adapter_effect_max_abs": (plain - ref).abs().max().item()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="13b")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    import synth
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = synth.build_model(a.work / "models" / a.shape, a.shape, device=device)
    adapter = build_adapter(base, a.work / "adapter" / a.shape, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    out = a.work / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")} | {
        "JOB_STAGE": "merge", "JOB_BASE_MODEL": str(base), "JOB_ADAPTER": str(adapter), "JOB_OUTPUT": str(out),
        "JOB_RUN_ID": f"merge-{a.shape}-{int(time.time())}", "JOB_WORKDIR": str(a.work / "scratch"),
        "JOB_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=ROOT)
    # RssAnon is what has to fit in RAM; RssFile is the safetensors files mapped in, page cache the kernel can drop.
    peaks = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        except OSError:
            pass
        time.sleep(0.2)
    wall = time.monotonic() - t0
    if proc.returncode:
        return proc.returncode
    # ru_maxrss of waited-for children: the merge process is the only one this script started.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    merged = out / env["JOB_RUN_ID"] / "merged"
    from safetensors import safe_open

    params = 0
    for shard in merged.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                params += n
    result = {
        "shape": a.shape, "parameters": params, "merge_wall_s": round(wall, 1),
        "merge_peak_rss_gib": round(peak / 2**30, 2), "peak_rss_bytes_per_parameter": round(peak / params, 2),
        "merge_peak_anon_gib": round(peaks["RssAnon"] / 2**30, 2),
        "peak_anon_bytes_per_parameter": round(peaks["RssAnon"] / params, 2),
        "merge_peak_file_mapped_gib": round(peaks["RssFile"] / 2**30, 2),
        "shards": sorted(s.name for s in merged.glob("*.safetensors")),
        "shard_gib": sorted(round(s.stat().st_size / 2**30, 2) for s in merged.glob("*.safetensors")),
        "compare_device": device, **compare(base, adapter, merged, device),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

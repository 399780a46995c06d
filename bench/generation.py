"""The before/after generations' speed, side by side in one process: transformers' `generate` against job/decode.py's
static-cache loop, eager and with the CUDA graph replayed per token, on the job's generation setting (4-bit base
with the dequantized copy kept, a LoRA adapter, as the "before" answers of an SFT run see it: adapter off).

    python bench/generation.py --model /tmp/qb/models/13b --out DIR [--prompts 8] [--new-tokens 256] [--repeats 2]

The prompts are the first records of the bench's synthetic SFT data (bench/synth.py), the seed's eval prompts' shape;
the random-weight model never says EOS, so every answer runs to --new-tokens. Writes DIR/generation-<tag>.json:
seconds and ms per new token for each way (the best of --repeats, after one warm-up call each), and the share of
tokens equal to generate's (bf16: ties between logits may break differently once; the test suite checks equality in
fp32, tests/test_decode.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", default="run")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import torch
    from peft import get_peft_model

    import synth
    from job import decode
    from job.model import keep_dequantized, load_base_model, load_tokenizer, lora_config
    from job.settings import load_settings

    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(a.model), "JOB_DATA": "/d", "JOB_OUTPUT": "/o"})
    tok, _ = load_tokenizer(a.model, None, "auto")
    model = get_peft_model(load_base_model(a.model, s), lora_config(s.lora))
    keep_dequantized(model)
    model.eval()
    records = synth.sft_records(a.prompts)
    encoded = [tok.apply_chat_template([{"role": "user", "content": r["text"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for r in records]
    batch = tok.pad({"input_ids": encoded}, padding_side="left", return_tensors="pt").to(model.device)

    def hf():
        out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=a.new_tokens,
                             min_new_tokens=a.new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id or 0,
                             use_cache=True)
        return out[:, batch["input_ids"].shape[1]:]

    def ours(graph):
        return lambda: decode.greedy(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=a.new_tokens,
                                     eos=[-1], deadline=time.monotonic() + 600, graph=graph)

    ways = {"transformers_generate": hf, "static_cache_eager": ours(False), "static_cache_cuda_graph": ours(True)}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a dry run of the script
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "versions": {m.__name__: m.__version__ for m in (torch, __import__("transformers"), __import__("peft"))},
           "prompts": a.prompts, "new_tokens": a.new_tokens, "prompt_tokens": [len(e) for e in encoded],
           "setting": "4-bit NF4 base with the dequantized bf16 copy kept, LoRA adapter disabled (SFT's before answers)",
           "ways": {}}
    tokens = {}
    with torch.no_grad(), model.disable_adapter():
        for name, fn in ways.items():
            fn()  # warm-up: cuBLAS, allocator
            times = []
            for _ in range(a.repeats):
                sync()
                t0 = time.perf_counter()
                out = fn()
                sync()
                times.append(time.perf_counter() - t0)
            tokens[name] = out.cpu()
            best = min(times)
            res["ways"][name] = {"seconds": [round(t, 3) for t in times], "best_s": round(best, 3),
                                 "ms_per_token": round(1000 * best / out.shape[1], 2), "new_tokens": out.shape[1]}
            print(f"{name}: {best:.2f}s, {1000 * best / out.shape[1]:.1f} ms per token", flush=True)
    ref = tokens["transformers_generate"]
    for name, t in tokens.items():
        n = min(t.shape[1], ref.shape[1])
        res["ways"][name]["equal_to_generate"] = round((t[:, :n] == ref[:, :n]).float().mean().item(), 4)
        first = [next((k for k in range(n) if t[r, k] != ref[r, k]), n) for r in range(t.shape[0])]
        res["ways"][name]["first_difference_per_prompt"] = first
    res["ways"]["static_cache_cuda_graph"]["equal_to_eager"] = bool(
        torch.equal(tokens["static_cache_cuda_graph"], tokens["static_cache_eager"]))
    g, h = res["ways"]["static_cache_cuda_graph"]["best_s"], res["ways"]["transformers_generate"]["best_s"]
    res["speedup_cuda_graph_vs_generate"] = round(h / g, 2)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"generation-{a.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["ways"]), flush=True)


if __name__ == "__main__":
    main()

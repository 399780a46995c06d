"""Unsloth as a peer: its QLoRA SFT or DPO on the benchmark's model and data, timed as bench.py times the job.

Unsloth pins its own transformers/TRL/datasets, so it runs in an environment of its own and in a process of its own
(it patches transformers and TRL when imported); bench.py starts this script with BENCH_UNSLOTH_PYTHONPATH as the
PYTHONPATH (bench/device/README.md says how that environment is carried to the GPU machine).

    python bench/unsloth_peer.py --model /tmp/qlora-bench/models/13b --data /tmp/qlora-bench/data/sft.jsonl \\
        --runs unsloth_lowmem,unsloth --steps 10 --out /tmp/unsloth.json
    python bench/unsloth_peer.py --stage dpo --data /tmp/qlora-bench/data/dpo.jsonl --runs unsloth ...
    python bench/unsloth_peer.py --stage sft,dpo --data .../sft.jsonl --dpo-data .../dpo.jsonl --runs unsloth ...

--stage sft,dpo runs each of --runs for SFT, then each for DPO, in this one process: Unsloth's import (about 40 s on
the GPU machine) is paid once for both stages.

Runs: `unsloth` (checkpointing off) and `unsloth_lowmem` (its "unsloth" checkpointing, which offloads to the CPU),
both with its fused LoRA kernels (LoRA dropout 0, which they require), r=16, alpha=16, the 7 projections, bf16, packing +
padding-free, fused AdamW; the layout (max length, per-device batch, accumulation) defaults to the one its 6,296
tokens/s were measured with on the H200 (one packed row of up to 8,192 tokens per step). Each run's results are
written to --out as soon as it ends, so a timeout keeps the finished ones.

DPO (--stage dpo): Unsloth's documented recipe, TRL's DPOTrainer as `import unsloth` patches it (PatchDPOTrainer is a
no-op since its trainers are patched on import), ref_model=None (the adapter disabled is the reference, as in the job),
beta 0.1, Unsloth's own defaults otherwise; the layout defaults to stock TRL's peer's and the job's (1,024 tokens, 4
pairs per micro-batch, 4 micro-batches per step). --data: JSON lines of prompt/chosen/rejected.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

CHECKPOINTING = {"unsloth": False, "unsloth_lowmem": "unsloth"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="the first stage's records: SFT text/output or DPO prompt/chosen/rejected (JSON lines)")
    p.add_argument("--dpo-data", help="with --stage sft,dpo: the DPO records (JSON lines of prompt/chosen/rejected)")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="unsloth_lowmem,unsloth")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--stage", choices=("sft", "dpo", "sft,dpo"), default="sft")
    p.add_argument("--layout", help="the first stage's max_length,per_device_batch,accumulation (default: SFT 8192,1,1, DPO --dpo-layout)")
    p.add_argument("--dpo-layout", default="1024,4,4", help="DPO's layout after SFT in --stage sft,dpo, or alone without --layout")
    a = p.parse_args(argv)
    stages = a.stage.split(",")
    if stages == ["sft", "dpo"] and not a.dpo_data:
        p.error("--stage sft,dpo needs --dpo-data")
    data = dict(zip(stages, (a.data, a.dpo_data)))
    # --layout is the only stage's (DPO's too, alone, as before --dpo-layout existed)
    layouts = {"sft": a.layout or "8192,1,1", "dpo": (a.layout if stages == ["dpo"] else None) or a.dpo_layout}

    t_import = time.perf_counter()
    import unsloth  # first: it patches transformers and TRL
    from unsloth import FastLanguageModel

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # StepTimer, trainer_metrics: timed exactly as the job's runs
    from peers import dpo_rows, sft_rows

    versions = {"unsloth": unsloth.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "trl": trl.__version__, "import_s": round(time.perf_counter() - t_import, 1)}
    print("unsloth peer:", json.dumps(versions), flush=True)
    cuda = torch.cuda.is_available()  # False only in the CPU test of this script, with a stand-in for unsloth
    records_of = {st: [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
                  for st, path in data.items()}  # each stage's file read once, whatever the number of runs
    results: list[dict] = []
    out = Path(a.out)

    for stage, name in [(st, n) for st in stages for n in a.runs.split(",")]:
        records = records_of[stage]
        max_length, batch, accumulation = (int(x) for x in layouts[stage].split(","))
        gc_mode = CHECKPOINTING[name]
        r: dict = {"name": name, "who": "unsloth", "stage": stage, "max_steps": a.steps, "versions": versions,
                   "layout": {"max_length": max_length, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation},
                   "gradient_checkpointing": bool(gc_mode), "checkpointing_mode": gc_mode or "off", "lora_dropout": 0.0}
        model = trainer = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            r["left_allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            model, tok = FastLanguageModel.from_pretrained(model_name=a.model, max_seq_length=max_length, load_in_4bit=True,
                                                           dtype=torch.bfloat16 if cuda else torch.float32,
                                                           local_files_only=True)
            model = FastLanguageModel.get_peft_model(
                model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                use_gradient_checkpointing=gc_mode, random_state=0)
            r["load_s"] = round(time.perf_counter() - t0, 2)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            timer = bench.StepTimer()
            common = dict(output_dir=f"/tmp/unsloth-peer-{stage}-{name}", max_steps=a.steps, logging_steps=1, report_to="none",
                          save_strategy="no", dataset_num_proc=1, per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation, optim="adamw_torch_fused" if cuda else "adamw_torch",
                          max_length=max_length, bf16=cuda, learning_rate=2e-4, seed=42)
            if stage == "sft":
                args = SFTConfig(**common, packing=True, padding_free=True,
                                 include_num_input_tokens_seen="non_padding")
                trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(sft_rows(records, tok)),
                                     processing_class=tok, callbacks=[timer])
            else:
                args = DPOConfig(**common, beta=0.1)
                trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_dict(dpo_rows(records, tok)),
                                     processing_class=tok, callbacks=[timer])
            result = trainer.train()
            r.update(bench.trainer_metrics(trainer, result))
            r.update(timer.steady(a.warmup))
            if stage == "dpo":  # as bench.py's stock-TRL DPO peer counts pairs
                per_step = batch * accumulation
                bench.pair_rates(r, min(r["steps"] * per_step, len(records)), per_step, result.metrics["train_runtime"])
                r["padding_free"] = bool(getattr(trainer.args, "padding_free", False))
            r["wall_s"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:  # report and go on to the next run
            traceback.print_exc()
            r["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        if cuda:
            r["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            r["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        del model, trainer
        results.append(r)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print("RESULT", json.dumps({k: r.get(k) for k in ("name", "stage", "tokens_per_second", "steady_tokens_per_second",
                                                           "steady_pairs_per_second", "peak_gpu_memory_gib", "error")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""qlora-job against the seed article's recipe, side by side on one GPU, same model shape, same data.

    python bench/bench.py run --shape 13b --out bench/results              # everything (about 20 min on an H100)
    python bench/bench.py run --shape 13b --parts sft --out DIR            # one part: sft, dpo or e2e
    python bench/bench.py report bench/results/*.json > bench/results/RESULTS.md

Parts (the first two run in this one process; seed runs first because the job's Liger kernels patch transformers'
Llama classes, and they are restored after every job run):
  sft   the seed's SFT recipe (bench/seed.py) for --seed-steps optimizer steps, then the job with its defaults and the
        variants named by --sft-variants, each through `job.pipeline.run(job.settings.load_settings(env))`;
  dpo   the same for DPO: the seed's DPO recipe, then the job's defaults and --dpo-variants (a new adapter on the
        base model for both, so that both have the bare base model as the reference);
  e2e   the seed's whole workload through the job's CLI (`python -m job` subprocesses, model load included): 1,729 SFT
        examples with docker/sft.env's settings, then 97 DPO pairs with docker/dpo.env's on top of the SFT adapter;
        wall-clock time, and the job's token count checked against our own count of the data.

Model: random weights in llm-jp-3's shape (bench/synth.py), built once per machine under --work. Data: seeded
synthetic records whose token lengths follow real instruction data (lognormal, median ~330, tail to 2k).

Numbers (each run): tokens/s = TRL's non-padding token count / train_runtime (the job's metrics.json
`tokens_per_second`); steady tokens/s = the same over the optimizer steps after --warmup-steps (step ends timed
after a CUDA sync); DPO pairs/s = pairs / train_runtime; peak = torch.cuda.max_memory_allocated from model load to
the end; MFU = model FLOP/s / 989 TFLOP/s (H100 SXM dense bf16), where a token costs 2N (forward) + 2N (backward to
the activations; the 4-bit base gets no weight gradient and LoRA's are negligible) + 2N more with gradient
checkpointing (the forward is recomputed), N = matmul parameters per token (decoder projections + LM head;
attention scores not counted); a DPO token adds 2N for the reference model's forward.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

import synth  # noqa: E402  (bench/synth.py)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM datasheet
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel", "triton")

def variant(batch: int, accumulation: int, checkpointing: str | None = None, **extra: str) -> dict:
    """JOB_ overrides: micro-batch size and accumulation (16 examples per step, as the defaults), checkpointing."""
    env = {"JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": str(batch), "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": str(accumulation)}
    if checkpointing:
        env["JOB_TRAIN__GRADIENT_CHECKPOINTING"] = checkpointing
    return {**env, **extra}


#: Job variants for either stage: JOB_ overrides on top of the job's defaults (`default` has none). A key starting
#: with "_" is a bench switch, not a setting: `_unsorted` turns off the length-sorted micro-batches
#: (job.stages.common.StepSortedSampler), leaving the plain seeded random order, to measure what sorting gains.
VARIANTS = {
    "default": {},
    "unsorted": {"_unsorted": "1"},
    # The documented low-memory setting (docs/benchmarks.md): two packed rows of 1024 tokens per micro-batch,
    # gradient checkpointing, 8-bit paged AdamW.
    "lowmem": variant(2, 8, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit"),
    "lowmem_bs1": variant(1, 16, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit"),
    **{f"{gc}_bs{bs}": variant(bs, 16 // bs, "true" if gc == "gc" else "false") for gc in ("gc", "nogc") for bs in (1, 2, 4, 8)},
    "gc_bs16": variant(16, 1, "true"),
    "nogc_bs2_unsorted": {**variant(2, 8, "false"), "_unsorted": "1"},
    "gc_bs8_unsorted": {**variant(8, 2, "true"), "_unsorted": "1"},
    # Low memory at the default micro-batch (4 packed rows of 1,024 tokens): checkpointing, 8-bit paged AdamW.
    "lowmem4": variant(4, 4, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit"),
    "lowmem8": variant(8, 2, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit"),
    # ... with the checkpointed layers' inputs in pinned CPU memory (JOB_TRAIN__OFFLOAD_CHECKPOINTS): 8 rows of 1,024
    # per micro-batch at the memory of 4 without it.
    "lowmem8_offload": variant(8, 2, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit", JOB_TRAIN__OFFLOAD_CHECKPOINTS="true"),
    "lowmem4_offload": variant(4, 4, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit", JOB_TRAIN__OFFLOAD_CHECKPOINTS="true"),
    # Levers, one at a time against `default` (docs/benchmarks.md, the levers): `sdpa` is the attention before job/attention.py
    # (packed rows as masked SDPA); `cudnn` lets SDPA use cuDNN again where job/attention.py's masked path avoids it;
    # `dropout0` is LoRA without dropout (a speed measurement only: the default changes only with learning evidence).
    "sdpa": {"_attn": "sdpa"},
    "cudnn": {"_cudnn": "1"},
    "dropout0": {"JOB_LORA__DROPOUT": "0"},
    # The 4-bit base dequantized once (JOB_QUANT__KEEP_DEQUANTIZED, +24 GiB at 13B): `auto` keeps it where it fits
    # (so `default` has it on a big card); these force it either way for the A/B.
    "dequant": {"JOB_QUANT__KEEP_DEQUANTIZED": "true"},
    "nodequant": {"JOB_QUANT__KEEP_DEQUANTIZED": "false"},
    "nogc": variant(4, 4, "false"),
    # PEFT's own LoRA forward instead of job/lora.py's lean one (docs/benchmarks.md, lever 15), at the default and at low memory.
    "peft_lora": {"_peft_lora": "1"},
    # DPO on TRL's padded batches instead of job/padfree.py's one row without padding (docs/benchmarks.md, lever 17);
    # for SFT the same setting means unpacked rows.
    "padded": {"JOB_TRAIN__PACKING": "false"},
    # 8 pairs per micro-batch, 2 per step (the same pairs and gradient per step as the default 4 x 4), checkpointing off
    # and the copy kept: `auto` would turn both off, since it sizes a DPO micro-batch as if every row were MAX_LENGTH.
    "dpo8": variant(8, 2, "false", JOB_QUANT__KEEP_DEQUANTIZED="true"),
    "lowmem4_peft_lora": {**variant(4, 4, "true", JOB_TRAIN__OPTIM="paged_adamw_8bit"), "_peft_lora": "1"},
    # The seed's row length (docker/sft.env: JOB_TRAIN__MAX_LENGTH=512) at the default micro-batch (4 rows: 2,048
    # tokens) and with the step's 16 rows in one micro-batch (8,192 tokens; the same rows and gradient per step):
    # what a larger micro-batch would buy the end-to-end run, whose SFT trains at 2,048 tokens per micro-batch.
    "len512": {"JOB_TRAIN__MAX_LENGTH": "512"},
    "len512_bs16": {**variant(16, 1), "JOB_TRAIN__MAX_LENGTH": "512"},
}


def pinned(rows: int, mode: str, copy: bool) -> dict:
    """One memory plan, fixed (no `auto` left): `rows` per micro-batch of the default 16-example step, `mode` keep
    (checkpointing off), gc, or off (checkpointing with the layer inputs offloaded), the dequantized copy or not. The
    sweep `auto` is measured against (issue 24)."""
    return {**variant(rows, 16 // rows, "false" if mode == "keep" else "true"),
            "JOB_TRAIN__OFFLOAD_CHECKPOINTS": "true" if mode == "off" else "false",
            "JOB_QUANT__KEEP_DEQUANTIZED": "true" if copy else "false", "JOB_TRAIN__MERGE_MICRO_BATCHES": "false"}


#: p_MODE[_copy]_ROWS: every memory plan job/memplan.py chooses among, pinned.
VARIANTS.update({f"p_{mode}{'_copy' if copy else ''}_{rows}": pinned(rows, mode, copy)
                 for mode in ("keep", "gc", "off") for copy in (False, True) for rows in (4, 8, 16)})

#: headline.json's rows: key -> (who, run name) in a result file. `job_lowmem` is the fastest low-memory setting (under 12 GiB:
#: 8 rows of 1,024 per micro-batch, checkpointing with the layer inputs offloaded, paged 8-bit AdamW; docs/benchmarks.md, lever 16).
HEADLINE_ROWS = {"job": ("job", "default"), "job_lowmem": ("job", "lowmem8_offload"), "seed": ("seed", "seed"),
                 "trl_best": ("trl", "trl_best"), "unsloth": ("unsloth", "unsloth"), "unsloth_lowmem": ("unsloth", "unsloth_lowmem")}
#: Rows the bench has no runner for, and why (instead of "not measured").
NOT_BUILT: dict = {}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- environment


def environment(argv: list[str]) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(["python", "bench/bench.py", *argv]),
           "python": platform.python_version(), "host": platform.node()}
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            env[name] = None
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = p.name
        env["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["sm_count"] = p.multi_processor_count
        # What the job's memory plan sees before loading: less than the card when bench/device/run.sh's holder keeps the
        # rest (a smaller card simulated, BUDGETS there).
        env["memory_free_gib"] = round(torch.cuda.mem_get_info()[0] / 2**30, 1)
    # A copy of the tree whose .git is missing or stale (e.g. a GPU machine's): BENCH_COMMIT says which commit it is.
    env["git_commit"] = os.environ.get("BENCH_COMMIT")
    if not env["git_commit"]:
        with contextlib.suppress(OSError):
            env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    return env


def peak_tflops(env: dict) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in (env.get("device") or "")), None)


# --------------------------------------------------------------------------------------------------- measurement


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """A TrainerCallback: time of each optimizer step's end (after a CUDA sync) and TRL's running token count."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.steps: list[tuple[int, float]] = []
                self.tokens: dict[int, float] = {}
                self.t_begin = None

            def on_train_begin(self, args, state, control, **kw):
                _sync()
                self.t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                self.steps.append((state.global_step, time.perf_counter()))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs:
                    self.tokens[state.global_step] = logs["num_tokens"]
                elif logs is not None and state.num_input_tokens_seen:  # a trainer that does not log TRL's count
                    self.tokens[state.global_step] = state.num_input_tokens_seen

            def steady(self, warmup: int) -> dict:
                """Tokens/s and steps/s between the end of step `warmup` and the last step."""
                t = dict(self.steps)
                steps = sorted(s for s in t if s >= warmup and s in self.tokens)
                if len(steps) < 2:
                    return {}
                a, b = steps[0], steps[-1]
                dt = t[b] - t[a]
                return {"steady_steps": b - a, "steady_seconds": round(dt, 3),
                        "steady_tokens": self.tokens[b] - self.tokens[a],
                        "steady_tokens_per_second": round((self.tokens[b] - self.tokens[a]) / dt, 1),
                        "seconds_per_step": round(dt / (b - a), 3),
                        "first_step_seconds": round(t[min(t)] - self.t_begin, 3) if self.t_begin else None,
                        "step_seconds": [round(y - x, 3) for (_, x), (_, y) in zip(self.steps, self.steps[1:])]}

        return _Timer()


def flops_per_token(n: int, *, gc: bool, dpo: bool) -> float:
    return n * (2 + 2 + (2 if gc else 0) + (2 if dpo else 0))


def add_rates(r: dict, env: dict, n: int, *, gc: bool, dpo: bool) -> dict:
    fpt = flops_per_token(n, gc=gc, dpo=dpo)
    peak = peak_tflops(env)
    r["flops_per_token"] = fpt
    for key, src in (("mfu", "tokens_per_second"), ("steady_mfu", "steady_tokens_per_second")):
        if r.get(src) and peak:
            r[key] = round(r[src] * fpt / (peak * 1e12), 4)
    return r


@contextlib.contextmanager
def gpu_run():
    """Fresh peak-memory counter; afterwards free everything and note what stayed allocated."""
    import torch

    box: dict = {}
    if not torch.cuda.is_available():
        yield box
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield box
    finally:
        box["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        box["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        gc.collect()
        torch.cuda.empty_cache()
        box["left_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)


@contextlib.contextmanager
def restore_llama_module():
    """Liger (use_liger_kernel) replaces classes and functions in transformers' Llama module for every later model;
    put them back so that a later seed run gets stock transformers."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        yield
    finally:
        for k, v in saved.items():
            if getattr(modeling_llama, k, None) is not v:
                setattr(modeling_llama, k, v)


# --------------------------------------------------------------------------------------------------- the runs


def trainer_metrics(trainer, result) -> dict:
    hist = trainer.state.log_history
    tokens = max((h.get("num_tokens") or 0 for h in hist), default=0) or trainer.state.num_input_tokens_seen
    runtime = result.metrics["train_runtime"]
    losses = [h["loss"] for h in hist if "loss" in h]
    return {"steps": trainer.state.global_step, "tokens": tokens, "train_runtime_s": round(runtime, 3),
            "tokens_per_second": round(tokens / runtime, 2) if tokens else None,
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def pair_rates(r: dict, pairs: int, per_step: int, runtime: float) -> None:
    """A DPO run's pairs, pairs/s over the whole run and steady pairs/s (per_step pairs per optimizer step, timed by
    StepTimer.steady), into r: one way for the seed recipe, the peers and bench/unsloth_peer.py."""
    r["pairs"] = pairs
    r["pairs_per_second"] = round(pairs / runtime, 4)
    if r.get("seconds_per_step"):
        r["steady_pairs_per_second"] = round(per_step / r["seconds_per_step"], 4)


def run_seed(stage: str, ctx: dict, name: str, steps: int, overrides: dict | None = None) -> dict:
    import seed  # bench/seed.py

    out = ctx["work"] / "seed" / name
    shutil.rmtree(out, ignore_errors=True)
    timer = StepTimer()
    r: dict = {"name": name, "who": "seed", "stage": stage, "max_steps": steps, "overrides": overrides or {}}
    with gpu_run() as mem:
        t0 = time.perf_counter()
        if stage == "sft":
            trainer = seed.sft_trainer(str(ctx["model"]), ctx["sft_records"], str(out), max_steps=steps, callbacks=[timer], **(overrides or {}))
        else:
            trainer = seed.dpo_trainer(str(ctx["model"]), ctx["dpo_records"], str(out), max_steps=steps, callbacks=[timer], **(overrides or {}))
        r["setup_s"] = round(time.perf_counter() - t0, 2)
        r["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
        r["bf16"], r["fp16"] = trainer.args.bf16, trainer.args.fp16
        result = trainer.train()
        r.update(trainer_metrics(trainer, result))
        r.update(timer.steady(ctx["warmup"]))
        if stage == "dpo":
            pair_rates(r, steps * 4, 4, result.metrics["train_runtime"])
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        del trainer, result
    r.update(mem)
    return add_rates(r, ctx["env"], ctx["n"], gc=r["gradient_checkpointing"], dpo=stage == "dpo")


def run_job(stage: str, ctx: dict, name: str, overrides: dict, steps: int, adapter: str | None = None) -> dict:
    from job import pipeline
    from job.settings import load_settings
    from job.stages import dpo as dpo_stage
    from job.stages import sft as sft_stage
    from job.stages import common
    from job.stages.common import StepSortedSampler

    module = sft_stage if stage == "sft" else dpo_stage
    runs = ctx["work"] / "runs"
    run_id = f"{stage}-{name}"
    shutil.rmtree(runs / run_id, ignore_errors=True)
    shutil.rmtree(ctx["work"] / "jobwork" / run_id, ignore_errors=True)
    env = {
        "JOB_STAGE": stage,
        "JOB_BASE_MODEL": str(ctx["model"]),
        "JOB_DATA": str(ctx["sft_data"] if stage == "sft" else ctx["dpo_data"]),
        "JOB_OUTPUT": str(runs),
        "JOB_WORKDIR": str(ctx["work"] / "jobwork"),
        "JOB_RUN_ID": run_id,
        "JOB_LOG_FORMAT": "json",
        "JOB_TRAIN__MAX_STEPS": str(steps),
        "JOB_TRAIN__LOGGING_STEPS": "1",  # per-step token counts for the steady-state rate
        # No before/after generations: they are outside the training time every figure here is computed from, and
        # took a minute of device time per 13B run (the e2e run keeps them: they are part of the workload).
        "JOB_EVAL_PROMPTS": "none",
        **({"JOB_ADAPTER": adapter} if adapter else {}),
        **overrides,
    }
    switches = {k for k in env if k.startswith("_")}
    settings = load_settings({k: v for k, v in env.items() if k not in switches})
    timer = StepTimer()
    original = module.build_trainer
    original_sampler = common.step_sorted_sampler
    if "_unsorted" in switches:  # steps of one example: the sampler's seeded permutation, unsorted
        common.step_sorted_sampler = lambda args, lengths: StepSortedSampler(lengths, 1, args.data_seed)
    from job import attention, lora

    original_choose, original_cudnn = attention.choose, attention.AVOID_CUDNN
    lora.LEAN = "_peft_lora" not in switches
    if "_attn" in switches:  # load the model with this attention instead of the job's choice
        attention.choose = lambda device, _impl=env["_attn"]: _impl
    if "_cudnn" in switches:
        attention.AVOID_CUDNN = False

    def build_trainer(*a, **kw):  # the job's own trainer, plus our timer
        trainer = original(*a, **kw)
        trainer.add_callback(timer)
        r["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)  # what `auto` chose
        r["per_device_train_batch_size"] = trainer.args.per_device_train_batch_size
        r["gradient_accumulation_steps"] = trainer.args.gradient_accumulation_steps
        r["attn_implementation"] = trainer.model.config._attn_implementation
        r["dequantized_gib"] = trainer.job_dequantized_gib  # what JOB_QUANT__KEEP_DEQUANTIZED chose (None: no copy)
        r["padding_free"] = bool(getattr(trainer, "job_padding_free", False))  # job/padfree.py (DPO)
        r["lean_lora_layers"] = sum("forward" in m.__dict__ for m in lora.lora_layers(trainer.model))  # job/lora.py
        return trainer

    r: dict = {"name": name, "who": "job", "stage": stage, "max_steps": steps, "overrides": overrides,
               "gradient_checkpointing_setting": settings.train.gradient_checkpointing}
    module.build_trainer = build_trainer
    try:
        with restore_llama_module(), gpu_run() as mem:
            t0 = time.perf_counter()
            out = Path(pipeline.run(settings))
            r["wall_s"] = round(time.perf_counter() - t0, 2)
    finally:
        module.build_trainer = original
        common.step_sorted_sampler = original_sampler
        attention.choose, attention.AVOID_CUDNN = original_choose, original_cudnn
        lora.LEAN = True
    m = json.loads((out / "metrics.json").read_text())
    r["metrics"] = m
    r.update({k: m.get(k) for k in ("steps", "tokens", "train_runtime_s", "tokens_per_second", "train_loss")})
    if stage == "dpo":
        r["pairs_per_second"] = m.get("pairs_per_second")
        bs = settings.train.per_device_train_batch_size * settings.train.gradient_accumulation_steps
        r["pairs"] = min(m["steps"] * bs, len(ctx["dpo_records"]))
    r.update(timer.steady(ctx["warmup"]))
    if stage == "dpo" and r.get("seconds_per_step"):
        r["steady_pairs_per_second"] = round(bs / r["seconds_per_step"], 4)
    r.update(mem)
    r["peak_gpu_memory_gib_job"] = m.get("peak_gpu_memory_gib")
    return add_rates(r, ctx["env"], ctx["n"], gc=r["gradient_checkpointing"], dpo=stage == "dpo")


#: Stock-TRL peers (bench/peers.py): name -> gradient checkpointing.
TRL_PEERS = {"trl_best": False, "trl_best_gc": True}


def run_trl(stage: str, ctx: dict, name: str, steps: int) -> dict:
    """A stock-TRL peer (bench/peers.py), timed like the job."""
    import peers  # bench/peers.py

    out = ctx["work"] / "trl" / f"{stage}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    timer = StepTimer()
    layout = dict(zip(("max_length", "per_device_train_batch_size", "gradient_accumulation_steps"), peers.JOB_LAYOUT))
    r: dict = {"name": name, "who": "trl", "stage": stage, "max_steps": steps, "layout": layout}
    records = ctx["sft_records"] if stage == "sft" else ctx["dpo_records"]
    make = peers.trl_sft_trainer if stage == "sft" else peers.trl_dpo_trainer
    with restore_llama_module(), gpu_run() as mem:  # Liger patches transformers' Llama module: put it back afterwards
        t0 = time.perf_counter()
        trainer = make(str(ctx["model"]), records, str(out), max_steps=steps, checkpointing=TRL_PEERS[name], callbacks=[timer])
        r["setup_s"] = round(time.perf_counter() - t0, 2)
        r["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
        r["attn_implementation"] = trainer.model.config._attn_implementation
        result = trainer.train()
        r.update(trainer_metrics(trainer, result))
        r.update(timer.steady(ctx["warmup"]))
        if stage == "dpo":
            per_step = layout["per_device_train_batch_size"] * layout["gradient_accumulation_steps"]
            pair_rates(r, min(r["steps"] * per_step, len(records)), per_step, result.metrics["train_runtime"])
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        del trainer, result
    r.update(mem)
    return add_rates(r, ctx["env"], ctx["n"], gc=r["gradient_checkpointing"], dpo=stage == "dpo")


def run_unsloth(ctx: dict, names: list[str], steps: int, timeout: float | None = None, stage: str = "sft") -> list[dict]:
    """Unsloth's SFT or DPO runs, or both (stage `sft+dpo`: SFT's then DPO's, one import of Unsloth for both), by
    bench/unsloth_peer.py in a process and an environment of their own: BENCH_UNSLOTH_PYTHONPATH is its PYTHONPATH,
    replacing ours (Unsloth pins older transformers and TRL than the job's)."""
    stages = stage.split("+")
    path = os.environ.get("BENCH_UNSLOTH_PYTHONPATH")
    if not path:
        return [{"name": n, "who": "unsloth", "stage": st, "skipped": "Unsloth's environment not given (BENCH_UNSLOTH_PYTHONPATH)"}
                for st in stages for n in names]
    out = ctx["work"] / f"unsloth-peer-{'-'.join(stages)}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": path}
    data = {"sft": ctx.get("sft_data"), "dpo": ctx.get("dpo_jsonl")}
    cmd = [sys.executable, str(ROOT / "bench" / "unsloth_peer.py"), "--stage", ",".join(stages), "--model", str(ctx["model"]),
           "--data", str(data[stages[0]]), "--out", str(out), "--runs", ",".join(names), "--steps", str(steps),
           "--warmup", str(ctx["warmup"])]
    if "dpo" in stages[1:]:
        cmd += ["--dpo-data", str(data["dpo"])]
    if "sft" in stages:  # DPO: the peer's default, the job's and stock TRL's layout
        cmd += ["--layout", ctx["unsloth_layout"]]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    note = None
    try:  # its output goes to ours (the log), its results to `out`, written after each run
        code = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout).returncode
        if code:
            note = f"unsloth_peer.py exited {code}"
    except subprocess.TimeoutExpired:
        note = f"unsloth_peer.py stopped after {timeout:.0f} s (the bench's deadline)"
    runs = json.loads(out.read_text()) if out.exists() else []
    done = {(r["stage"], r["name"]) for r in runs}
    runs += [{"name": n, "who": "unsloth", "stage": st, "skipped": note or "no result"}
             for st in stages for n in names if (st, n) not in done]
    for r in runs:
        r["process_wall_s"] = round(time.perf_counter() - t0, 2)
        if not r.get("error") and not r.get("skipped"):
            add_rates(r, ctx["env"], ctx["n"], gc=r["gradient_checkpointing"], dpo=r["stage"] == "dpo")
    return runs


def env_file(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def count_tokens(ctx: dict, stage: str, max_length: int, eval_fraction: float = 0.0) -> dict:
    """Our own count of the non-padding tokens one epoch of the job trains on: its prompt format and its length
    policy (README: JOB_TRAIN__OVER_LENGTH=cut_prompt, the default) re-derived here from the rendered lengths, as a
    cross-check of TRL's count in metrics.json: an example that fits counts whole; a longer one whose answer and EOS
    fit with BOS and one prompt token fills max_length (DPO: the prompt is cut so the longer answer fits); else dropped."""
    from job import data
    from job.model import load_tokenizer
    from job.settings import ColumnSettings

    tok, _ = load_tokenizer(ctx["model"], None, "auto")
    path = ctx["sft_data"] if stage == "sft" else ctx["dpo_data"]
    records = data.load_records(path, str(path), stage, ColumnSettings())
    train, _ = data.split_eval(records, eval_fraction, 42)

    def ids(messages, gen=False):
        return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)

    total = kept = 0
    for r in train:
        answers = [r["completion"]] if stage == "sft" else [r["chosen"], r["rejected"]]
        prompt = len(ids(r["prompt"], gen=True))
        lengths = [len(ids(r["prompt"] + a)) - prompt for a in answers]  # each answer with its EOS
        longest = max(lengths)
        if prompt + longest <= max_length:
            total += sum(prompt + n for n in lengths)
        elif longest + 2 <= max_length:
            total += sum(max_length - longest + n for n in lengths)
        else:
            continue
        kept += 1
    return {"examples": len(train), "kept": kept, "tokens": total}


#: End-to-end runs: name -> JOB_ overrides on top of docker/*.env. `e2e_nogen` leaves out the before/after
#: generations every run makes by default (job/evaluate.py, added after the issue's 202 s baseline was measured).
E2E_RUNS = {"e2e": {}, "e2e_nogen": {"JOB_EVAL_PROMPTS": "none"}}
#: On top of docker/*.env in every e2e run: the benchmark's synthetic answers are longer than the seed's data (a quarter
#: of its examples are over sft.env's 512 tokens), which the job refuses by default (JOB_MAX_OVER_LENGTH_SHARE=0.1,
#: exit 3); the seed's SFTTrainer cut them silently. The seed's workload is measured as the seed ran it.
E2E_SETTINGS = {"JOB_MAX_OVER_LENGTH_SHARE": "1"}


def run_e2e(ctx: dict, name: str = "e2e") -> dict:
    """The seed's whole workload through `python -m job`, as a user runs it (docker/*.env settings, local paths)."""
    runs = ctx["work"] / "e2e-runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(ctx["work"] / "e2e-work", ignore_errors=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    base.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])})
    paths = {"JOB_BASE_MODEL": str(ctx["model"]), "JOB_OUTPUT": str(runs), "JOB_WORKDIR": str(ctx["work"] / "e2e-work"),
             "JOB_LOG_FORMAT": "json"}
    out: dict = {"name": name, "who": "job", "stage": "sft+dpo"}
    stages = []
    for stage, envf in (("sft", "sft.env"), ("dpo", "dpo.env")):
        env = {**base, **env_file(ROOT / "docker" / envf), **E2E_SETTINGS, **paths, **E2E_RUNS[name],
               "JOB_DATA": str(ctx["sft_data"] if stage == "sft" else ctx["dpo_data"])}
        if stage == "dpo":
            env["JOB_ADAPTER"] = str(runs / stages[0]["run_id"] / "adapter")
        t0, started = time.perf_counter(), time.time()
        p = subprocess.run([sys.executable, "-m", "job"], env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        # The job's JSON log (timestamped): where the time outside training goes (imports, load, generations, upload).
        (ctx.get("out", ctx["work"]) / f"{name.replace('_', '-')}-{stage}.log.jsonl").write_text(p.stdout + p.stderr)
        # start and end on the log's clock: the log's first and last lines then split off imports and exit
        s = {"stage": stage, "run_id": env["JOB_RUN_ID"], "exit_code": p.returncode, "wall_s": round(wall, 2),
             "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds"),
             "ended": datetime.fromtimestamp(started + wall, timezone.utc).isoformat(timespec="milliseconds"),
             "settings": {k: v for k, v in env.items() if k.startswith("JOB_") and k not in paths and k != "JOB_DATA"}}
        if p.returncode != 0:
            s["stderr_tail"] = (p.stderr or p.stdout)[-3000:]
            stages.append(s)
            break
        m = json.loads((runs / s["run_id"] / "metrics.json").read_text())
        s["metrics"] = m
        s["phases_s"] = json.loads((runs / s["run_id"] / "run.json").read_text()).get("phases_s")  # job/phases.py
        s["files"] = sorted(x.name for x in (runs / s["run_id"]).iterdir())
        # The job's count (TRL's) against ours, for one epoch of the training split
        mine = count_tokens(ctx, stage, int(env.get("JOB_TRAIN__MAX_LENGTH", 1024)), float(env.get("JOB_EVAL_FRACTION", 0)))
        s["our_token_count"] = mine
        s["token_count_matches"] = mine["tokens"] == m.get("tokens")
        stages.append(s)
        log(f"e2e {stage}: exit {p.returncode}, {wall:.1f}s, tokens job {m.get('tokens')} ours {mine['tokens']}")
    out["stages"] = stages
    out["wall_s"] = round(sum(s["wall_s"] for s in stages), 2)
    out["ok"] = all(s["exit_code"] == 0 for s in stages) and len(stages) == 2
    return out


# --------------------------------------------------------------------------------------------------- driver


def prepare(shape: str, work: Path, env: dict, n_sft: int = 1729, n_dpo: int = 97) -> dict:
    import torch

    from job.model import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "models" / shape
    t0 = time.perf_counter()
    built = not (model_dir / "config.json").exists()
    synth.build_model(model_dir, shape, device="cuda" if torch.cuda.is_available() else "cpu")
    build_s = round(time.perf_counter() - t0, 1)
    log(f"model {shape}: {'built' if built else 'found'} in {build_s}s at {model_dir}")
    vocab = synth.VOCAB_SIZE if shape != "tiny" else 1000
    sft_records = synth.sft_records(n_sft, vocab=vocab)
    dpo_records = synth.dpo_records(n_dpo, vocab=vocab)
    sft_data = synth.write_sft(work / "data" / "sft.jsonl", sft_records)
    dpo_data = synth.write_dpo(work / "data" / "preferences.csv", dpo_records)
    dpo_jsonl = work / "data" / "dpo.jsonl"  # the same pairs for the Unsloth peer, which reads JSON lines
    dpo_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dpo_records), encoding="utf-8")
    tok, _ = load_tokenizer(model_dir, None, "auto")
    chat = lambda p, a: len(tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=True, return_dict=False))  # noqa: E731
    data_stats = {
        "sft_example_tokens": synth.length_stats([chat(r["text"], r["output"]) for r in sft_records]),
        "dpo_pair_tokens": synth.length_stats([chat(r["prompt"], r["chosen"]) + chat(r["prompt"], r["rejected"]) for r in dpo_records]),
    }
    log(f"data: {json.dumps(data_stats)}")
    return {"shape": shape, "work": work, "model": model_dir, "env": env, "n": synth.matmul_params(shape, vocab),
            "sft_records": sft_records, "dpo_records": dpo_records, "sft_data": sft_data, "dpo_data": dpo_data, "dpo_jsonl": dpo_jsonl,
            "data_stats": data_stats, "model_build_s": build_s, "model_built": built}


def summary_line(r: dict) -> str:
    if r.get("skipped"):
        return f"{r['who']:7} {r['stage']:4} {r['name']:16} SKIPPED {r['skipped']}"
    if r.get("error"):
        return f"{r['who']:7} {r['stage']:4} {r['name']:16} ERROR {r['error'][:200]}"
    rate = f"{r.get('tokens_per_second') or 0:9.1f} tok/s (steady {r.get('steady_tokens_per_second') or 0:9.1f})"
    if r["stage"] == "dpo":
        rate += f" {r.get('pairs_per_second') or 0:6.3f} pairs/s (steady {r.get('steady_pairs_per_second') or 0:6.3f})"
    return (f"{r['who']:7} {r['stage']:4} {r['name']:16} {rate} peak {r.get('peak_gpu_memory_gib')} GiB "
            f"MFU {r.get('steady_mfu')} steps {r.get('steps')}")


def parse_plan(text: str) -> list[tuple[str, str, list[str], int | None]]:
    """`STAGE:WHO:NAME[+NAME...][@STEPS]` items, comma-separated, run in this order; `e2e` alone for the end-to-end
    run. WHO: seed, job (NAME a VARIANTS key), trl (a TRL_PEERS key), unsloth (its runs in one item share one process)."""
    plan = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        if item in E2E_RUNS:
            plan.append(("sft+dpo", "e2e", [item], None))
            continue
        spec, _, steps = item.partition("@")
        stage, who, names = spec.split(":")
        names = names.split("+")
        known = {"seed": {"seed", "seed_nogc"}, "job": set(VARIANTS), "trl": set(TRL_PEERS), "unsloth": {"unsloth", "unsloth_lowmem"}}
        stages = ("sft", "dpo", "sft+dpo") if who == "unsloth" else ("sft", "dpo")  # Unsloth: both stages, one import
        if stage not in stages or who not in known or not set(names) <= known[who]:
            raise SystemExit(f"--plan: can't run {item!r} (STAGE sft|dpo (sft+dpo for unsloth), WHO seed|job|trl|unsloth, "
                             f"NAME one of {sorted(known.get(who, []))})")
        plan.append((stage, who, names, int(steps) if steps else None))
    return plan


def plan_from_parts(a) -> list[tuple[str, str, list[str], int | None]]:
    """The plan the --parts/--*-variants options describe: seed recipes first, then the job's variants, then e2e."""
    parts = a.parts.split(",")
    plan = []
    if "sft" in parts and a.seed_steps:
        plan.append(("sft", "seed", ["seed"], a.seed_steps))
    if "sft" in parts and a.seed_nogc_steps:
        plan.append(("sft", "seed", ["seed_nogc"], a.seed_nogc_steps))
    if "dpo" in parts and a.dpo_seed_steps:
        plan.append(("dpo", "seed", ["seed"], a.dpo_seed_steps))
    for stage in ("sft", "dpo"):
        if stage in parts:  # a variant is NAME or NAME@STEPS (its own number of optimizer steps)
            for v in filter(None, (a.sft_variants if stage == "sft" else a.dpo_variants).split(",")):
                v, _, n = v.partition("@")
                plan.append((stage, "job", [v], int(n) if n else None))
    if "e2e" in parts:
        plan.append(("sft+dpo", "e2e", ["e2e"], None))
    return plan


def default_steps(a, stage: str, who: str) -> int:
    if who == "seed":
        return a.seed_steps if stage == "sft" else a.dpo_seed_steps
    return a.job_steps if stage.startswith("sft") else a.dpo_job_steps  # Unsloth's sft+dpo: SFT's


def cmd_run(a, argv: list[str]) -> int:
    started = time.perf_counter()  # --deadline-s counts from here: the model build is part of the budget
    import torch

    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[job] %(message)s"))
    logging.getLogger("job").addHandler(handler)
    logging.getLogger("job").setLevel(logging.INFO)
    logging.getLogger("job.metrics").setLevel(logging.WARNING)  # one line per step: too many here
    env = environment(argv)
    log(f"environment: {json.dumps(env)}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"bench-{a.shape}{('-' + a.tag) if a.tag else ''}.json"
    ctx = prepare(a.shape, Path(a.work), env, a.sft_examples, a.dpo_pairs)
    ctx["warmup"] = a.warmup_steps
    ctx["out"] = out_dir
    res = {"shape": a.shape, "environment": env, "matmul_params": ctx["n"], "model_build_s": ctx["model_build_s"],
           "data": ctx["data_stats"], "flop_formula": __doc__.split("Numbers (each run): ")[1].strip(), "runs": []}

    def save():
        result_path.write_text(json.dumps(res, indent=2, default=str) + "\n")

    save()  # the environment and the data's statistics, even if the first run never ends

    def attempt(fn, *args, **kw):
        who, stage, name = kw.pop("ident")
        log(f"--- {who} {stage} {name}")
        try:
            r = fn(*args, **kw)
        except Exception as exc:  # one failed run must not lose the others
            traceback.print_exc()
            r = {"name": name, "who": who, "stage": stage, "error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(Exception):
                gc.collect()
                torch.cuda.empty_cache()
        res["runs"].append(r)
        save()
        log(summary_line(r) if "who" in r and r.get("stage") != "sft+dpo" else json.dumps(r)[:2000])
        return r

    plan = parse_plan(a.plan) if a.plan else plan_from_parts(a)
    res["plan"] = [f"{st}:{who}:{'+'.join(names)}@{n}" for st, who, names, n in plan]
    ctx["unsloth_layout"] = a.unsloth_layout

    def left() -> float | None:
        return None if a.deadline_s is None else a.deadline_s - (time.perf_counter() - started)

    for stage, who, names, steps in plan:
        steps = steps if steps is not None else default_steps(a, stage, who)
        if left() is not None and left() <= 0:  # out of time: say so for each run left, so the file is complete
            for st in (stage.split("+") if who == "unsloth" else [stage]):
                for name in names:
                    res["runs"].append({"name": name, "who": "job" if who == "e2e" else who, "stage": st,
                                        "skipped": f"the bench's deadline ({a.deadline_s} s) passed"})
            save()
            continue
        if who == "unsloth":
            log(f"--- unsloth {'+'.join(names)}")
            # Its process may run a minute past the deadline (a run started before it is allowed to finish).
            runs = run_unsloth(ctx, names, steps, timeout=None if left() is None else left() + 60, stage=stage)
            res["runs"] += runs
            save()
            for r in runs:
                log(summary_line(r))
        elif who == "e2e":
            attempt(run_e2e, ctx, names[0], ident=("job", "sft+dpo", names[0]))
        elif who == "seed":
            overrides = {"gradient_checkpointing": False} if names[0] == "seed_nogc" else None
            attempt(run_seed, stage, ctx, names[0], steps, overrides, ident=(who, stage, names[0]))
        elif who == "trl":
            attempt(run_trl, stage, ctx, names[0], steps, ident=(who, stage, names[0]))
        else:
            attempt(run_job, stage, ctx, names[0], VARIANTS[names[0]], steps, ident=(who, stage, names[0]))
    res["ratios"] = ratios(res["runs"])
    save()
    log("summary")
    for r in res["runs"]:
        print("  " + (summary_line(r) if r.get("stage") in ("sft", "dpo") else json.dumps({k: r.get(k) for k in ("name", "ok", "wall_s", "error")})))
    print(json.dumps(res["ratios"], indent=1))
    return 0


def ratios(runs: list[dict]) -> dict:
    by = {(r.get("who"), r.get("stage"), r.get("name")): r for r in runs if not r.get("error")}
    out = {}
    for stage, key in (("sft", "tokens_per_second"), ("dpo", "pairs_per_second")):
        seed = by.get(("seed", stage, "seed"))
        if not seed:
            continue
        for (who, st, name), r in by.items():
            if who == "job" and st == stage:
                for k in (key, f"steady_{key}"):
                    if r.get(k) and seed.get(k):
                        out[f"{stage}:{name}/seed:{k}"] = round(r[k] / seed[k], 2)
    return out


# --------------------------------------------------------------------------------------------------- report


def cmd_report(a) -> int:
    files = [Path(f) for f in a.files]
    print("# Benchmark results\n")
    print("Generated by `python bench/bench.py report " + " ".join(str(f) for f in a.files) + "` from the JSON beside this file.\n")
    for f in files:
        res = json.loads(f.read_text())
        env = res["environment"]
        print(f"## {f.name}: {res['shape']} shape\n")
        print(f"- device: {env.get('device')} ({env.get('device_memory_gib')} GiB), CUDA {env.get('cuda')}; date {env.get('date')}; commit {env.get('git_commit')}")
        print("- versions: " + ", ".join(f"{k} {env.get(k)}" for k in PACKAGES) + f", python {env.get('python')}")
        print(f"- command: `{env.get('command')}`")
        print(f"- N (matmul parameters per token) = {res['matmul_params']:,}; data: SFT example tokens {res['data']['sft_example_tokens']}; DPO pair tokens {res['data']['dpo_pair_tokens']}\n")
        rows = [r for r in res["runs"] if r.get("stage") in ("sft", "dpo") or r.get("error") or r.get("skipped")]
        if rows:
            print("| run | stage | tokens/s | steady tokens/s | pairs/s | steady pairs/s | peak GiB | steady MFU | GC | steps |")
            print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
            for r in rows:
                if r.get("error") or r.get("skipped"):
                    why = f"error: {r['error'][:120]}" if r.get("error") else f"skipped: {r['skipped'][:120]}"
                    print(f"| {r.get('who')} {r['name']} | {r.get('stage')} | {why} | | | | | | | |")
                    continue
                f2 = lambda x, d=1: "" if x is None else f"{x:,.{d}f}"  # noqa: E731
                label = "seed recipe" if r["who"] == "seed" and r["name"] == "seed" else f"{r['who']} {r['name']}"
                print(f"| {label} | {r['stage']} | {f2(r.get('tokens_per_second'))} | {f2(r.get('steady_tokens_per_second'))} | "
                      f"{f2(r.get('pairs_per_second'), 3)} | {f2(r.get('steady_pairs_per_second'), 3)} | {f2(r.get('peak_gpu_memory_gib'), 2)} | "
                      f"{f2(r.get('steady_mfu') and 100 * r['steady_mfu'])}% | {'on' if r.get('gradient_checkpointing') else 'off'} | {r.get('steps')} |")
            print()
        for r in res["runs"]:
            if r.get("name") in E2E_RUNS and r.get("stages"):
                print(f"End to end{' without generations' if r['name'] == 'e2e_nogen' else ''} (`python -m job`, "
                      f"docker/sft.env then docker/dpo.env, model load included): **{r['wall_s']:.0f} s** "
                      f"({'ok' if r.get('ok') else 'FAILED'})\n")
                print("| stage | wall s | train runtime s | tokens (job) | tokens (our count) | tokens/s | pairs/s | peak GiB |")
                print("|---|---:|---:|---:|---:|---:|---:|---:|")
                for s in r["stages"]:
                    m = s.get("metrics", {})
                    print(f"| {s['stage']} | {s['wall_s']:.1f} | {m.get('train_runtime_s')} | {m.get('tokens')} | {s.get('our_token_count', {}).get('tokens')} | "
                          f"{m.get('tokens_per_second')} | {m.get('pairs_per_second', '')} | {m.get('peak_gpu_memory_gib')} |")
                print()
        if res.get("note"):
            print(f"Note: {res['note']}\n")
        rat = ratios(res["runs"])
        if rat:
            print("Ratios job/seed: " + ", ".join(f"`{k}` {v}×" for k, v in rat.items()) + "\n")
    return 0


#: The goals of issue 13 (on the H200, seed-like data): (headline path, comparison, target).
GOALS = [
    ("sft steady tokens/s", ("sft", "job", "steady_tokens_per_s"), ">=", 8000),
    ("sft whole-run tokens/s", ("sft", "job", "tokens_per_s"), ">=", 6000),
    ("sft steady MFU", ("sft", "job", "mfu_steady"), ">=", 0.43),
    ("sft steady vs unsloth", ("sft", "job/unsloth", "steady_tokens_per_s"), ">=", 1.2),
    ("sft steady vs trl_best", ("sft", "job/trl_best", "steady_tokens_per_s"), ">=", 1.5),
    ("low-memory peak GiB", ("sft", "job_lowmem", "peak_gib"), "<=", 12),
    ("low-memory steady tokens/s", ("sft", "job_lowmem", "steady_tokens_per_s"), ">=", 5000),
    ("dpo steady pairs/s", ("dpo", "job", "steady_pairs_per_s"), ">=", 6),
    ("seed workload end to end, s", ("e2e",), "<=", 150),
]


def headline_row(r: dict | None, source: str) -> dict:
    """One peer's figures in headline.json's shape, or {"skipped": why}."""
    if r is None:
        return {"skipped": f"not measured in {source}"}
    if r.get("skipped") or r.get("error"):
        return {"skipped": r.get("skipped") or f"failed: {r['error'][:300]}", "source": source}
    row = {"tokens_per_s": r.get("tokens_per_second"), "steady_tokens_per_s": r.get("steady_tokens_per_second")}
    if r["stage"] == "dpo":
        row.update(pairs_per_s=r.get("pairs_per_second"), steady_pairs_per_s=r.get("steady_pairs_per_second"))
    row.update(peak_gib=r.get("peak_gpu_memory_gib"), mfu_steady=r.get("steady_mfu"),
               gradient_checkpointing=r.get("gradient_checkpointing"), steps=r.get("steps"), source=source)
    for k in ("attn_implementation", "layout", "overrides"):
        if r.get(k):
            row[k] = r[k]
    return row


def headline(files: list[Path]) -> dict:
    """headline.json from one or more result files of one shape. For a run in several files the last measured one
    counts: a later skipped or failed attempt does not hide an earlier measurement."""
    results = [(f, json.loads(f.read_text())) for f in files]
    shapes = {res["shape"] for _, res in results}
    if len(shapes) != 1:
        raise SystemExit(f"headline: one shape at a time, got {sorted(shapes)}")
    shape = shapes.pop()
    env = results[-1][1]["environment"]  # the last file: its runs win (each row names its own source)
    out: dict = {"device": env.get("device"), "date": env.get("date"), "commit": env.get("git_commit"),
                 "versions": {k: env.get(k) for k in (*PACKAGES, "python", "cuda")},
                 "sources": [{"file": f.name, "command": res["environment"].get("command"), "date": res["environment"].get("date"),
                              "commit": res["environment"].get("git_commit")} for f, res in results]}
    runs: dict = {}
    for f, res in results:
        for r in res["runs"]:
            key = (r.get("who"), r.get("stage"), r.get("name"))
            measured = not (r.get("skipped") or r.get("error"))
            if measured or key not in runs or runs[key][0].get("skipped") or runs[key][0].get("error"):
                runs[key] = (r, f.name)
    for stage in ("sft", "dpo"):
        block = {}
        for key, (who, name) in HEADLINE_ROWS.items():
            r, src = runs.get((who, stage, name), (None, ", ".join(f.name for f, _ in results)))
            block[key] = {"skipped": NOT_BUILT[(stage, key)]} if r is None and (stage, key) in NOT_BUILT else headline_row(r, src)
        out[f"{stage}_{shape}"] = block
    e2e, _ = runs.get(("job", "sft+dpo", "e2e"), (None, None))
    out["e2e_seconds"] = e2e["wall_s"] if e2e and e2e.get("ok") else None
    # Like for like with the issue's 202 s baseline, which predates the before/after generations (not a goal row).
    nogen, _ = runs.get(("job", "sft+dpo", "e2e_nogen"), (None, None))
    if nogen and nogen.get("ok"):
        out["e2e_seconds_without_generations"] = nogen["wall_s"]
    if e2e and (e2e.get("skipped") or e2e.get("error")):
        out["e2e"] = {"skipped": e2e.get("skipped") or f"failed: {e2e['error'][:300]}"}
    elif e2e is None:
        out["e2e"] = {"skipped": "not measured in " + ", ".join(f.name for f, _ in results)}
    if e2e and e2e.get("stages"):
        out["e2e"] = {s["stage"]: {"wall_s": s["wall_s"], "train_runtime_s": s.get("metrics", {}).get("train_runtime_s"),
                                   "exit_code": s["exit_code"]} for s in e2e["stages"]}
    out["goals"] = goals(out, shape)
    return out


def goals(h: dict, shape: str) -> dict:
    out = {}
    for label, path, op, target in GOALS:
        if path == ("e2e",):
            value = h.get("e2e_seconds")
        else:
            stage, who, key = path
            block = h.get(f"{stage}_{shape}", {})
            mine, _, peer = who.partition("/")
            value = block.get(mine, {}).get(key)
            if peer:
                other = block.get(peer, {}).get(key)
                value = round(value / other, 3) if value and other else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[label] = {"target": f"{op} {target}", "measured": value, "met": met}
    return out


def card(files: list[Path]) -> dict:
    """One entry of headline.json's `cards`: a card (or a smaller one simulated on it, BUDGETS in bench/device/run.sh)
    measured in one call: the job's `default` (`auto`) against every other job variant measured beside it, per stage
    (`auto_vs_best`), and against each peer the call ran (`auto_vs_peers`, named WHO_NAME)."""
    results = [(f, json.loads(f.read_text())) for f in files]
    env = results[0][1]["environment"]
    entry: dict = {"device": env.get("device"), "memory_free_gib": env.get("memory_free_gib"), "date": env.get("date"),
                   "commit": env.get("git_commit"), "versions": {k: env.get(k) for k in (*PACKAGES, "python", "cuda")},
                   "sources": [f.name for f, _ in results]}
    runs = [r for _, res in results for r in res["runs"]]
    shape = results[0][1]["shape"]
    for stage, key in (("sft", "steady_tokens_per_s"), ("dpo", "steady_pairs_per_s")):
        block: dict = {}
        for r in runs:
            if r.get("stage") != stage:
                continue
            row = headline_row(r, next(f.name for f, res in results if r in res["runs"]))
            if r.get("who") == "job":
                plan = ((r.get("metrics") or {}).get("memory_plan") or {})
                row["plan"] = plan.get("chosen")
                for k in ("estimated_peak_gib", "free_gib"):
                    if plan.get(k) is not None:
                        row[k] = plan[k]
            block[r["name"] if r.get("who") == "job" else f"{r.get('who')}_{r['name']}"] = row
        job = {k: v for k, v in block.items() if v.get(key) and k in {r["name"] for r in runs if r.get("who") == "job"}}
        if len(job) == 1:  # nothing to compare `auto` with: no claim either way
            block["job_best"] = {"skipped": f"only {next(iter(job))!r} of the job's variants was measured in this call"}
            block["auto_vs_best"] = None
        elif job:
            best = max(job, key=lambda k: job[k][key])
            block["job_best"] = {"name": best, key: job[best][key]}
            if job.get("default"):
                block["auto_vs_best"] = round(job["default"][key] / job[best][key], 3)
        peers = {f"{r['who']}_{r['name']}" for r in runs if r.get("stage") == stage and r.get("who") != "job"}
        peers = {k: block[k][key] for k in peers if block[k].get(key)}
        if (block.get("default") or {}).get(key) and peers:  # `auto` against each peer measured in this call
            block["auto_vs_peers"] = {k: round(block["default"][key] / v, 3) for k, v in peers.items()}
        entry[f"{stage}_{shape}"] = block or {"skipped": f"no {stage.upper()} run of {', '.join(f.name for f, _ in results)} "
                                                       "has a result"}
    e2e = next((r for r in runs if r.get("name") == "e2e" and r.get("ok")), None)
    entry["e2e_seconds"] = e2e["wall_s"] if e2e else None
    return entry


def cmd_card(a) -> int:
    """Add (or replace: same device, free memory and date) a card entry in headline.json."""
    entry = card([Path(f) for f in a.files])
    path = Path(a.headline)
    h = json.loads(path.read_text())
    same = lambda c: (c.get("device"), c.get("memory_free_gib"), c.get("date")) == (entry["device"], entry["memory_free_gib"], entry["date"])  # noqa: E731
    h["cards"] = [c for c in h.get("cards", []) if not same(c)] + [entry]
    path.write_text(json.dumps(h, indent=2) + "\n")
    print(json.dumps({k: entry.get(k) for k in ("device", "memory_free_gib")} | {
        s: {k: v.get(k) for k in ("job_best", "auto_vs_best")} for s, v in entry.items() if s.startswith(("sft_", "dpo_"))},
        indent=1))
    return 0


def cmd_headline(a) -> int:
    h = headline([Path(f) for f in a.files])
    text = json.dumps(h, indent=2) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shape", choices=sorted(synth.SHAPES), default="13b")
    r.add_argument("--parts", default="sft,dpo,e2e")
    r.add_argument("--out", default=str(ROOT / "bench" / "results"))
    r.add_argument("--work", default="/tmp/qlora-bench")
    r.add_argument("--tag", default="")
    r.add_argument("--seed-steps", type=int, default=12, help="optimizer steps of the seed's SFT (4 examples each)")
    r.add_argument("--seed-nogc-steps", type=int, default=0, help="also the seed's SFT with checkpointing off")
    r.add_argument("--job-steps", type=int, default=10, help="optimizer steps of each job SFT run (-1: one epoch)")
    r.add_argument("--dpo-seed-steps", type=int, default=8)
    r.add_argument("--dpo-job-steps", type=int, default=-1)
    r.add_argument("--sft-examples", type=int, default=1729, help="the seed's SFT set size")
    r.add_argument("--dpo-pairs", type=int, default=97, help="the seed's preference set size")
    r.add_argument("--warmup-steps", type=int, default=2)
    r.add_argument("--sft-variants", default="default,lowmem@5")
    r.add_argument("--dpo-variants", default="default")
    r.add_argument("--plan", help="the runs, in this order, instead of --parts and the --*-variants: e.g. "
                   "sft:job:default@8,sft:unsloth:unsloth_lowmem+unsloth@10,sft:trl:trl_best,dpo:job:default,e2e")
    r.add_argument("--deadline-s", type=float, help="start no run after this many seconds (the rest are recorded as skipped)")
    r.add_argument("--unsloth-layout", default="8192,1,1", help="Unsloth's max_length,per_device_batch,accumulation")
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    hp = sub.add_parser("headline", help="bench/results/headline.json from result files of one shape")
    hp.add_argument("files", nargs="+")
    hp.add_argument("--out")
    cp = sub.add_parser("card", help="add one card's entry (result files of one call) to headline.json's `cards`")
    cp.add_argument("files", nargs="+")
    cp.add_argument("--headline", default=str(ROOT / "bench" / "results" / "headline.json"))
    a = p.parse_args(argv)
    return {"run": lambda: cmd_run(a, argv), "report": lambda: cmd_report(a), "headline": lambda: cmd_headline(a),
            "card": lambda: cmd_card(a)}[a.cmd]()


if __name__ == "__main__":
    sys.exit(main())

"""The memory plan: how a stage spends the GPU memory left after the model is loaded, for speed.

Four choices, none of which changes what is trained (each is outside the run's identity, job/preflight.py):
- gradient checkpointing (JOB_TRAIN__GRADIENT_CHECKPOINTING): recompute each layer in the backward instead of keeping
  its activations;
- the checkpointed layers' inputs in pinned CPU memory (JOB_TRAIN__OFFLOAD_CHECKPOINTS), with checkpointing;
- a dequantized copy of the 4-bit base (JOB_QUANT__KEEP_DEQUANTIZED);
- fewer, larger micro-batches of the same step (JOB_TRAIN__MERGE_MICRO_BATCHES).

`auto` weighs every combination: each one's peak memory is estimated from the model's shape and this run's real
example lengths (the worst micro-batch the trainer's sampler will draw, job/stages/common.py StepSortedSampler), each
one's speed from a small model calibrated on 13B measurements (docs/benchmarks.md, "The memory plan"), and the fastest
combination that fits the GPU's free memory wins. With several processes every rank takes one agreed plan.

The plan, what it was chosen over and the estimated peak go into metrics.json (`memory_plan`) beside the measured
peak, so that every run checks the estimate."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

log = logging.getLogger("job")

GIB = 2**30

# --- the memory model (bytes), calibrated on measured peaks (docs/benchmarks.md, "The memory plan") --------------
#: Activations one token keeps per decoder layer without checkpointing, bf16 elements = A*hidden + B*intermediate,
#: with Liger's kernels and the job's lean LoRA forward: fitted to the measured 9.66 MiB per token of a 13B (hidden
#: 5,120, intermediate 13,824, 40 layers; H100/H200 SFT, 4,096 and 8,192 tokens per micro-batch) and 2.9 MiB of a 1.8B
#: (2,048 / 7,168 / 24 layers).
PER_LAYER_LIGER = (4.2, 7.6)
#: Without Liger (no GPU kernels): RMSNorm's fp32 copies and the unfused SwiGLU's intermediates (not measured on a GPU:
#: the earlier formula's difference, 10 x hidden + 1 x intermediate, kept).
PER_LAYER_PLAIN = (14.2, 8.6)
#: DPO keeps less per token than SFT: measured 6.5 MiB per token of the worst micro-batch at 13B (H100, padding-free,
#: 32.4 GiB above the loaded model at 5,049 tokens, 51.7 GiB at 8,133), 0.68 x SFT's; 0.72 keeps a margin.
DPO_PER_TOKEN = 0.72
#: Under checkpointing a layer's backward recomputes that layer: its activations are alive once, with the recompute's
#: transients (x1.5, measured: 13B SFT at 8,192 tokens 8.1 GiB above the loaded model, estimated 8.8).
RECOMPUTE = 1.5
#: Offloaded inputs still on the GPU: the layer being copied out and the one fetched back (job/offload.py).
OFFLOAD_RESIDENT_LAYERS = 2
#: Added to every estimate: LM-head chunks, kernels' workspaces, the allocator's rounding.
FIXED = int(1.5 * GIB)
#: The activation estimate's own margin (the fit above is exact at its two points; other shapes are not measured).
MARGIN = 1.05
#: What of the free memory a plan may use: the caching allocator reserves more than it allocates (3-7% measured).
USABLE = 0.97
RESERVE = GIB // 2

# --- the speed model, relative step throughput: calibrated on 13B H100/H200 runs ---------------------------------
#: Checkpointing at the same micro-batch: 13B SFT 4,534-5,055 tokens/s against 6,814-7,815 without (x0.65); the
#: offload costs 5% more (4,299 vs 4,534 at 4 rows, 5,846-6,100 vs 6,138 at 8).
MODE_SPEED = {"keep": 1.0, "checkpoint": 0.65, "offload": 0.62}
#: The dequantized copy: 13B SFT +8-14% (7,787 vs 6,814; 7,923-8,032 vs 7,167-7,377), DPO +14% (7.84 vs 6.86 pairs/s).
COPY_SPEED = 1.10
#: Tokens a micro-batch "costs" in fixed overhead (a micro-batch of T tokens runs at T / (T + T0) of the ideal):
#: SFT without checkpointing 4 -> 8 packed rows of 1,024 +6% (T0 ~520); with checkpointing 4 -> 8 rows +25%
#: (T0 ~2,700); DPO 4 -> 8 pairs (2,920 -> 5,840 mean tokens) +30% (T0 ~2,500: the reference forward, TRL's loss).
OVERHEAD_TOKENS = {("sft", False): 520, ("sft", True): 2700, ("dpo", False): 2500, ("dpo", True): 2500}


@dataclass(frozen=True)
class MemoryPlan:
    """What a stage keeps in GPU memory: activations (checkpointing off), the dequantized copy, rows per micro-batch,
    and with checkpointing whether the layers' inputs wait in CPU memory."""

    checkpointing: bool
    dequantized: bool
    micro_batch: int
    offload: bool = False
    #: Why: the free memory, the estimate, the alternatives (metrics.json `memory_plan`); not part of the choice.
    report: dict | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass
class Workload:
    """What the memory and speed models need to know about this run's data: for a micro-batch of n examples (SFT:
    packed rows when packing; DPO: pairs), the most tokens any micro-batch will compute and the mean."""

    stage: str
    rows: int
    accumulation: int
    mergeable: bool  # no padding (packed SFT, padding-free DPO): a merged micro-batch computes no more tokens
    worst: dict[int, int]
    mean: dict[int, float]

    def sizes(self) -> list[int]:
        return sorted(self.worst)

    def tokens(self, n: int) -> tuple[int, float]:
        """The worst and mean micro-batch of n examples; a size not replayed (a retry's recorded choice from other
        settings) scaled from the largest replayed one."""
        if n in self.worst:
            return self.worst[n], self.mean[n]
        k = max(self.worst)
        return math.ceil(self.worst[k] * n / k), self.mean[k] * n / k


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def workload(s, train_rows: list[dict] | None, world_size: int = 1, *, padding_free: bool = True) -> Workload:
    """This run's micro-batches for each size `auto` may choose (the set size times a divisor of the accumulation):
    packed SFT rows are full (MAX_LENGTH tokens each); otherwise the trainer's own sampler is replayed over the
    training rows, so the estimate is the run's real worst micro-batch, not every row at MAX_LENGTH."""
    from job.stages.common import StepSortedSampler

    t = s.train
    rows, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    sizes = [rows * k for k in _divisors(accumulation)]
    dpo = s.stage == "dpo"
    mergeable = bool(t.packing) and (dpo and padding_free or not dpo)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids") if dpo else ("input_ids",)
    tokenized = bool(train_rows) and all(k in train_rows[0] for k in keys)
    if not dpo and t.packing or not tokenized:  # packed rows, or rows TRL will tokenize: every row at MAX_LENGTH
        per = 2 * t.max_length if dpo else t.max_length
        return Workload(s.stage, rows, accumulation, mergeable, {n: n * per for n in sizes}, {n: float(n * per) for n in sizes})
    if dpo:
        real = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows]
        padded = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train_rows]
    else:
        real = padded = [len(r["input_ids"]) for r in train_rows]
    step = rows * accumulation * max(1, world_size)
    # Every epoch the run draws (up to 8), within about two million examples replayed in all (a few seconds).
    epochs = max(1, min(_epochs(s, len(train_rows), step), 2_000_000 // (len(train_rows) * len(sizes))))
    worst, mean = {}, {}
    for n in sizes:
        biggest, total, count = 0, 0, 0
        for epoch in range(epochs):
            sampler = StepSortedSampler(padded, step, t.seed)
            sampler.set_epoch(epoch)
            order = list(sampler)
            for i in range(0, len(order), n):
                chunk = order[i : i + n]
                tokens = sum(real[j] for j in chunk) if mergeable else (2 if dpo else 1) * len(chunk) * max(padded[j] for j in chunk)
                biggest, total, count = max(biggest, tokens), total + tokens, count + 1
        worst[n], mean[n] = biggest, total / max(1, count)
    return Workload(s.stage, rows, accumulation, mergeable, worst, mean)


def _epochs(s, n: int, step: int) -> int:
    """Epochs the run will draw (capped: the sampler's order is replayed for each)."""
    t = s.train
    if t.max_steps and t.max_steps > 0:
        epochs = math.ceil(t.max_steps * step / max(1, n))
    else:
        epochs = math.ceil(t.num_train_epochs)
    return max(1, min(epochs, 8))


def per_layer_bytes(config, liger: bool, row_tokens: int = 0) -> int | None:
    """Bytes one token keeps per decoder layer without checkpointing; None when the config does not say. A mixture of
    experts runs each token through `num_experts_per_tok` experts' MLPs; transformers' eager attention (Gemma-2's
    softcap, job/fastpaths.py) keeps each row's scores and probabilities, heads x `row_tokens` per token (bf16, plus the
    fp32 softmax)."""
    h, i, n = (getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    if not (isinstance(h, int) and isinstance(i, int) and isinstance(n, int)):
        return None
    experts = getattr(config, "num_experts_per_tok", None)
    if isinstance(experts, int) and experts > 1:
        i = int(getattr(config, "moe_intermediate_size", None) or i) * experts
    a, b = PER_LAYER_LIGER if liger else PER_LAYER_PLAIN
    attention = 0
    if getattr(config, "_attn_implementation", None) == "eager":
        attention = int(getattr(config, "num_attention_heads", 0) or 0) * row_tokens * 8
    return int(2 * (a * h + b * i)) + attention


def estimate(config, tokens: int, mode: str, liger: bool, *, stage: str = "sft", copy: int = 0,
             trainable: int = 0, row_tokens: int = 0) -> int | None:
    """Peak GPU bytes above the loaded model for a micro-batch of `tokens` tokens: `mode` keep (no checkpointing),
    checkpoint, or offload; `copy` the dequantized copy's bytes; `trainable` the adapter's parameters (fp32 weight,
    gradient and two Adam moments each); `row_tokens` the longest row (eager attention)."""
    per_layer = per_layer_bytes(config, liger, row_tokens)
    if per_layer is None:
        return None
    h, n = config.hidden_size, config.num_hidden_layers
    if stage == "dpo":
        per_layer = int(DPO_PER_TOKEN * per_layer)
    if mode == "keep":
        per_token = n * per_layer
    else:  # each layer's input (bf16) stays, on the GPU or (offload) all but the two in flight
        kept = n if mode == "checkpoint" else min(n, OFFLOAD_RESIDENT_LAYERS)
        per_token = kept * 2 * h + RECOMPUTE * per_layer
    lm_head = 0 if liger else tokens * int(getattr(config, "vocab_size", 0) or 0) * 10  # bf16 logits, fp32 loss, grad
    return int(MARGIN * (tokens * per_token + lm_head)) + FIXED + copy + 16 * trainable


def speed(stage: str, mean_tokens: float, mode: str, copy: bool) -> float:
    """Relative throughput of a plan (only the order matters)."""
    t0 = OVERHEAD_TOKENS[(stage, mode != "keep")]
    return MODE_SPEED[mode] * (COPY_SPEED if copy else 1.0) * mean_tokens / (mean_tokens + t0)


def liger_on(s) -> bool:
    """Liger's kernels in use: set, installed, and a GPU to run them (the trainer's arguments say the same)."""
    import importlib.util

    return bool(s.train.use_liger_kernel and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel"))


def adapter_parameters(s, model) -> int:
    """The adapter's trainable parameters (fp32 weight, gradient, two Adam moments on the GPU): counted on a
    continued adapter, estimated from the LoRA rank for a new one (r x (in + out) per targeted linear layer)."""
    if hasattr(model, "peft_config"):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = getattr(model, "config", None)
    h, i, n = (getattr(config, k, 0) or 0 for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    if not (isinstance(h, int) and isinstance(i, int) and isinstance(n, int)):
        return 0
    return int(s.lora.r) * n * (4 * 2 * h + 3 * (h + i))  # q, k, v, o and gate, up, down (an upper bound with GQA)


def usable(free: int) -> int:
    return int(USABLE * free) - RESERVE


@dataclass(frozen=True)
class Candidate:
    mode: str
    copy: bool
    rows: int
    need: int
    speed: float

    def plan(self) -> MemoryPlan:
        return MemoryPlan(self.mode != "keep", self.copy, self.rows, self.mode == "offload")

    def describe(self) -> dict:
        return {"checkpointing": self.mode != "keep", "offload": self.mode == "offload", "dequantized": self.copy,
                "micro_batch": self.rows, "estimated_gib": round(self.need / GIB, 2), "relative_speed": round(self.speed, 3)}


def _given(setting: str, forced: bool | None) -> list[bool] | None:
    """The values a choice may take: a retry's forced one, a setting's true/false, or both for `auto`."""
    if forced is not None:
        return [forced]
    return [setting == "true"] if setting != "auto" else None


def choose(s, model, work: Workload, *, liger: bool, cuda: bool, free: int | None, copy_bytes: int, trainable: int,
           checkpointing: bool | None = None, keep_dequantized: bool | None = None, micro_batch_rows: int | None = None,
           offload: bool | None = None) -> MemoryPlan:
    """The plan for this run: every combination the settings (and a retry's forced choices) leave open, the fastest
    whose estimate fits `free` bytes. Without a GPU or a config the planner can read: checkpointing on, the rest as set
    (nothing to gain on a CPU)."""
    t = s.train
    config = getattr(model, "config", None)
    gc_values = _given(t.gradient_checkpointing, checkpointing) or [False, True]
    off_values = _given(t.offload_checkpoints, offload) or [False, True]
    copy_values = _given(s.quant.keep_dequantized, keep_dequantized) or [False, True]
    if s.quant.load_in != "4bit" or copy_bytes == 0:
        copy_values = [v for v in copy_values if not v] or [False]
    if micro_batch_rows is not None:
        sizes = [micro_batch_rows]
    elif t.merge_micro_batches == "true":
        sizes = [work.rows * work.accumulation]
    elif t.merge_micro_batches == "false" or not work.mergeable:
        sizes = [work.rows]  # padded micro-batches: a merged one would also pad more (not measured to pay)
    else:
        sizes = work.sizes()
    known = cuda and free is not None and per_layer_bytes(config, liger) is not None
    if not known:  # a CPU run, or a model whose shape the planner can't read: careful defaults
        gc = checkpointing if checkpointing is not None else (t.gradient_checkpointing != "false")
        copy = keep_dequantized if keep_dequantized is not None else s.quant.keep_dequantized == "true"
        off = bool(gc and cuda and (offload if offload is not None else t.offload_checkpoints == "true"))
        rows = sizes[-1] if micro_batch_rows is not None or t.merge_micro_batches == "true" else work.rows
        why = "no GPU" if not cuda else "the model's shape is not one the planner reads"
        return MemoryPlan(gc, copy, rows, off, report={"auto": False, "why": why})
    candidates = []
    for gc in gc_values:
        for off in (off_values if gc and cuda else [False]):
            mode = "offload" if off else ("checkpoint" if gc else "keep")
            for copy in copy_values:
                for n in sizes:
                    worst, mean = work.tokens(n)
                    need = estimate(config, worst, mode, liger, stage=work.stage, row_tokens=t.max_length,
                                    copy=copy_bytes if copy else 0, trainable=trainable)
                    candidates.append(Candidate(mode, copy, n, need, speed(work.stage, mean, mode, copy)))
    room = usable(free)
    fitting = [c for c in candidates if c.need <= room]
    # Fastest first; among equals the one that needs least.
    pool = fitting or [min(candidates, key=lambda c: c.need)]
    best = max(pool, key=lambda c: (c.speed, -c.need))
    plan = best.plan()
    worst, mean = work.tokens(best.rows)  # the chosen micro-batch's tokens
    runners_up = sorted((c for c in fitting if c is not best), key=lambda c: (-c.speed, c.need))
    report = {
        "auto": True,
        "free_gib": round(free / GIB, 2),
        "usable_gib": round(room / GIB, 2),
        "worst_micro_batch_tokens": worst,
        "mean_micro_batch_tokens": round(mean, 1),
        "chosen": best.describe(),
        "fits": bool(fitting),
        "faster_but_too_big": [c.describe() for c in sorted(candidates, key=lambda c: -c.speed)
                               if c.speed > best.speed and c.need > room][:3],
        "next_best": [c.describe() for c in runners_up[:2]],
    }
    log.info("memory plan: checkpointing %s%s, dequantized copy %s, micro-batches of %d rows x %d per step: ~%.1f GiB "
             "estimated of %.1f GiB free (worst micro-batch %d tokens)%s",
             "on" if plan.checkpointing else "off", " with layer inputs offloaded" if plan.offload else "",
             "kept" if plan.dequantized else "not kept", plan.micro_batch, work.rows * work.accumulation // plan.micro_batch,
             best.need / GIB, free / GIB, worst,
             "" if fitting else "; nothing was estimated to fit: the smallest plan is tried",
             extra={"fields": {"event": "memory_plan", "memory_plan": report}})
    return MemoryPlan(plan.checkpointing, plan.dequantized, plan.micro_batch, plan.offload, report=report)


def same_on_every_process(plan: MemoryPlan) -> MemoryPlan:
    """With several processes (torchrun), one plan for all, from each one's choices in one all-reduce: each GPU's free
    memory may differ, and processes that differ would go wrong together: accumulating over different numbers of
    micro-batches, they wait for each other forever at the gradient all-reduce; with checkpointing or the copy on one
    rank only, the steps' speed and memory differ and the rank that guessed high runs out of memory. The most careful
    choice of each wins: checkpointing if any chose it, the offload if any chose it, the copy only if all did, the
    smallest micro-batch (each is the set size times a divisor of the accumulation, so it divides the step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    chosen = torch.tensor([int(plan.checkpointing), int(not plan.dequantized), -plan.micro_batch, int(plan.offload)],
                          device=device)
    dist.all_reduce(chosen, op=dist.ReduceOp.MAX)
    checkpointing, no_copy, rows, off = (int(v) for v in chosen.tolist())
    agreed = MemoryPlan(bool(checkpointing), not no_copy, -rows, bool(off and checkpointing), report=plan.report)
    if agreed != plan:
        log.info("memory plan agreed by all %d processes: %s (this one chose %s)", dist.get_world_size(), agreed, plan)
        if agreed.report is not None:
            agreed.report["agreed_by_processes"] = {"world_size": dist.get_world_size(), "checkpointing": agreed.checkpointing,
                                                    "offload": agreed.offload, "dequantized": agreed.dequantized,
                                                    "micro_batch": agreed.micro_batch}
    return agreed


# --- before the weights: --check and the preflight ------------------------------------------------------------------

def load_bytes(meta, quant) -> tuple[int, int]:
    """GPU bytes the base model takes once loaded, from its modules on the meta device (job/preflight.py), and its
    quantized linear layers' bytes dequantized (the copy): 4-bit NF4 ~0.52 bytes per linear weight (with double
    quantization's absmax), 8-bit ~1, otherwise 2 (bf16); embeddings, norms and the LM head (never quantized) 2.
    Measured: llm-jp-3-13b loads in 8.02-8.08 GiB (H100, r24a), this gives 7.99."""
    import torch.nn as nn

    per_weight = {"4bit": 0.5 + 1 / 64, "8bit": 1.0 + 4 / 4096}.get(quant.load_in, 2.0)
    linear = sum(m.weight.numel() for name, m in meta.named_modules()
                 if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head")
    total = sum(p.numel() for p in meta.parameters())
    return int(linear * per_weight + (total - linear) * 2), (2 * linear if quant.load_in == "4bit" else 0)


def preview(s, meta, train_rows: list[dict] | None, device, *, padding_free: bool, world_size: int = 1) -> dict:
    """The plan `auto` is expected to choose on this GPU, before any weights are downloaded (--check shows it), from
    the model's modules on the meta device and the fitted training rows. Raises OutOfMemory when the weights and even
    the smallest plan can't fit in the GPU's free memory: that run would fail after the download."""
    import torch

    from job.errors import OutOfMemory

    if getattr(device, "type", str(device).split(":")[0]) != "cuda" or not torch.cuda.is_available():
        return {"auto": False, "why": "no GPU"}
    load, copy = load_bytes(meta, s.quant)
    free = torch.cuda.mem_get_info(torch.device(device))[0]
    work = workload(s, train_rows, world_size, padding_free=padding_free)
    plan = choose(s, meta, work, liger=liger_on(s), cuda=True, free=max(0, free - load), copy_bytes=copy,
                  trainable=adapter_parameters(s, meta))
    report = dict(plan.report or {})
    report.update(model_gib=round(load / GIB, 2), free_before_loading_gib=round(free / GIB, 2), predicted=True)
    smallest = report.get("chosen", {}).get("estimated_gib")
    if load > free or not report.get("fits", True) and smallest is not None and load + smallest * GIB > free:
        t = s.train
        raise OutOfMemory(
            f"JOB_BASE_MODEL: this GPU has {free / GIB:.1f} GiB free; the model takes ~{load / GIB:.1f} GiB loaded "
            f"({s.quant.load_in}) and training ~{smallest or 0:.1f} GiB more even with gradient checkpointing and "
            f"micro-batches of {t.per_device_train_batch_size} x up to {t.max_length} tokens: lower "
            f"JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE or JOB_TRAIN__MAX_LENGTH, or use a GPU with more memory")
    log.info("memory plan expected on this GPU (%.1f GiB free, the model ~%.1f GiB): %s", free / GIB, load / GIB,
             report.get("chosen"))
    return report

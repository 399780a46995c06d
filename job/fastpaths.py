"""The speed layer in one table: which fast paths a run uses with the model in hand, and why any is off.

Each path is on only where it is proven for the model: what it needs is read from the model's class and config (the
capability flags transformers itself declares) and from the machine, once, before any weights are downloaded
(job/preflight.py, so `--check` reports it), and again at load from the same function. torchtune's habit: one switch
per component, validated up front; an unsupported combination is refused with what to set, or falls back with a line
in the log, in `--check` and in `metrics.json` (`fast_paths`).

| path | needs | else |
|---|---|---|
| packed attention (job/attention.py) | transformers' attention interface (`_supports_attention_backend`), SDPA support (no soft-capping: Gemma-2) | softcap models: transformers' `eager` (packed rows through its block mask); no attention interface: packed SFT refused (set JOB_TRAIN__PACKING=false) |
| padding-free DPO (job/padfree.py) | the packed attention above, with the varlen kernel on a GPU (else one dense mask over all rows) | TRL's padded batches |
| lean LoRA forward (job/lora.py) | PEFT LoRA layers it is exact for (decided per layer by job/lora.py) | PEFT's forward |
| dequantized copy (job/model.py) | a 4-bit base; memory (the plan, job/stages/common.py) | bitsandbytes' dequantization per call |
| offloaded checkpoints (job/offload.py) | checkpointing on, a CUDA GPU | activations kept on the GPU |

Sliding windows (Mistral, Phi-3, Qwen2/3, Gemma-2/3, Starcoder2) go to the varlen kernel as its window (or, on the
CPU, a windowed mask per example); tests/test_families.py compares packed against separate rows for each family.

    >>> fast = decide(settings, config, "cuda:0")
    >>> fast.attention, fast.report()["padding_free_dpo"]
    ('packed_varlen', {'on': True, 'why': '...'})
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from job import attention
from job.errors import ModelError

log = logging.getLogger(__name__)

#: Every fast path, in the order the report lists them.
PATHS = ("packed_attention", "padding_free_dpo", "lean_lora", "dequantized_copy", "offloaded_checkpoints")


@dataclass
class FastPaths:
    #: `attn_implementation` to load the model with
    attention: str | None
    #: name -> (on, why); the last two are completed by the memory plan when the trainer is built
    paths: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def padding_free(self) -> bool:
        return self.paths["padding_free_dpo"][0]

    def set(self, name: str, on: bool, why: str) -> None:
        self.paths[name] = (bool(on), why)

    def report(self) -> dict:
        return {name: {"on": self.paths[name][0], "why": self.paths[name][1]} for name in PATHS if name in self.paths}


def model_class(config):
    """The transformers class that loads this config as a causal LM, or None (custom code, unknown type)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def capabilities(cls, config) -> dict:
    """What the fast paths need to know about a model, from its class's declared capabilities and its config."""
    name = getattr(cls, "__name__", None) or (getattr(config, "architectures", None) or ["?"])[0]
    return {
        "architecture": name,
        "attention_interface": bool(getattr(cls, "_supports_attention_backend", False)),
        "sdpa": bool(getattr(cls, "_supports_sdpa", False)),
        "softcap": getattr(config, "attn_logit_softcapping", None) is not None,
        "sliding_window": getattr(config, "sliding_window", None),
        "alibi": bool(getattr(config, "alibi", False)) or getattr(config, "model_type", "") in ("bloom", "mpt"),
    }


def decide(s, config, device, *, cls=None) -> FastPaths:
    """The fast paths for settings `s`, a model config and a device. Raises ModelError (exit 4) for a combination
    that would train wrongly, naming the architecture and what to set."""
    cls = cls or model_class(config)
    caps = capabilities(cls, config)
    arch = caps["architecture"]
    packing = bool(s.train.packing)
    fast = FastPaths(attention=None)

    if not caps["attention_interface"]:
        # Its attention is its own code: the job's packed attention can't be registered for it, and a packed row
        # (several examples, positions restarting) would attend across examples. Padded batches are exact.
        why = (f"{arch} computes attention in its own code, not through transformers' attention interface"
               + (" (ALiBi)" if caps["alibi"] else ""))
        if packing and s.stage == "sft":
            raise ModelError(f"JOB_BASE_MODEL: {arch} can't train packed rows: {why}, so examples packed into one row "
                             "would attend to each other. Set JOB_TRAIN__PACKING=false to train it with padded batches")
        fast.attention = "sdpa" if caps["sdpa"] else "eager"
        fast.set("packed_attention", False, why + f"; transformers' {fast.attention} on padded batches")
        fast.set("padding_free_dpo", False, why + "; TRL's padded batches" if packing else "JOB_TRAIN__PACKING=false")
    elif caps["softcap"] or not caps["sdpa"]:
        # transformers' eager attention applies the soft-capping; its block mask keeps packed examples apart.
        why = f"{arch} " + ("soft-caps attention logits" if caps["softcap"] else "does not support SDPA")
        fast.attention = "eager"
        fast.set("packed_attention", False, why + ": transformers' eager attention" + (
            " with its block mask for packed rows" if packing and s.stage == "sft" else ""))
        fast.set("padding_free_dpo", False, why + "; TRL's padded batches" if packing else "JOB_TRAIN__PACKING=false")
    else:
        fast.attention = attention.choose(device)
        kernel = attention.kernel_available(device)
        window = caps["sliding_window"]
        where = "the variable-length flash kernel" if kernel else (
            "one causal SDPA per example (CPU)" if str(device).startswith("cpu") else "sdpa's dense block mask")
        if fast.attention == attention.NAME:
            fast.set("packed_attention", packing, (f"packed rows through {where}" + (f", window {window}" if window else ""))
                     if packing else "JOB_TRAIN__PACKING=false")
        else:
            fast.set("packed_attention", False, f"no variable-length flash attention for {device} in this torch: sdpa")
        if not packing:
            fast.set("padding_free_dpo", False, "JOB_TRAIN__PACKING=false")
        elif fast.attention != attention.NAME:
            fast.set("padding_free_dpo", False, "needs the packed attention; sdpa would run one dense mask over all rows")
        else:
            fast.set("padding_free_dpo", True, f"a micro-batch's rows as one row through {where}")
    return fast


def for_model(s, model, device) -> FastPaths:
    """decide() for a loaded model (a PeftModel's base too); the same answer preflight gave from the config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return decide(s, base.config, device, cls=type(base))

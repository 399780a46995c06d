"""The LoRA adapter: `JOB_LORA__*` -> PEFT's `LoraConfig` (any of its fields, by its own name, checked by PEFT's own
class when the settings load), and a leaner forward for PEFT's LoRA linear layers where it is exact for the variant.

The lean forward, for mixed-precision training: the same function, fewer passes over memory, and a recompute that can stop earlier under gradient checkpointing.

PEFT 0.21's 4-bit LoRA layer (`peft.tuners.lora.bnb.Linear4bit.forward`) computes

    result = base(x).clone();  result = result + lora_B(lora_A(dropout(x))) * scaling

that is, besides the two GEMMs of the base and of B, four elementwise passes over an output-sized tensor (the clone,
the scaling, the sum) and a fifth in the backward (the scaling again), in the share of the H200 profile that was
neither GEMM nor attention. Here:

    b = linear(lora_A(dropout(x)), scaling * B)      # the scaling folded into B's r columns (tiny)
    b += x @ W.T                                     # the kept copy (job.model.keep_dequantized): the GEMM adds in place
    b += base(x)                                     # or bitsandbytes' 4-bit layer: one sum

Everything the backward needs from this layer (the dropout's mask and output, A's output) is saved before the base is
called. With checkpointing torch stops each layer's recompute once the last saved tensor is back (non-reentrant
checkpointing's early stop), so the base GEMM of a layer's last projection (the MLP's down projection, 22% of a
Llama layer's weights) is no longer recomputed, nor dequantized: bitsandbytes' matmul keeps its state outside autograd's
saved tensors. PEFT calls the base first, so that recompute ran every time.

Only for adapters whose layers compute `base(x) + B(A(dropout(x))) * scaling` (plain LoRA and rsLoRA, which differ in
the scaling only; `lean_forward_applies` says so from the config, and make_lean installs nothing otherwise: DoRA and
every other variant PEFT computes through its `lora_variant` objects keep PEFT's forward), and per call only under
autocast (training and evaluation in bf16/fp16: what the job runs on a GPU), for one active adapter, unmerged, without
a LoRA bias, and with the input already in the base's compute dtype.
Anything else (inference without autocast, adapters disabled for DPO's reference, mixed adapter batches) goes
through PEFT's own forward, unchanged. The dropout draws the same masks in the same order as PEFT's forward, so a seeded
run sees the same randomness; tests/test_lora.py compares both forwards' losses and gradients.

Measured on an H200, 13B, against PEFT's forward in the same process (docs/benchmarks.md, lever 15): SFT +5.2%
(8,730 vs 8,297 tokens/s), with checkpointing +5.5%, DPO +4.1% without the dequantized copy and +0.3% with it."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

import torch

# ------------------------------------------------------------------------------------------ JOB_LORA__* -> LoraConfig

#: The job's short names for LoraConfig's fields (JOB_LORA__R, JOB_LORA__TARGET_MODULES keep PEFT's names).
SHORT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}

#: LoraConfig fields the job or PEFT sets: what to use instead.
MANAGED = {
    **{peft: f"JOB_LORA__{short.upper()}" for peft, short in SHORT_NAMES.items()},
    "task_type": "nothing (the job trains a causal LM)",
    "inference_mode": "nothing (the adapter is trained)",
    "peft_type": "nothing (PEFT fills it in)",
    "auto_mapping": "nothing (PEFT fills it in)",
    "peft_version": "nothing (PEFT fills it in)",
    "base_model_name_or_path": "JOB_BASE_MODEL",
    "revision": "JOB_BASE_MODEL=hf://org/model@revision",
}

#: init_lora_weights values that the job refuses, and why. PiSSA, OLoRA and CorDA start the adapter from the base
#: weights' leading directions and leave the base as the residual W - scaling * B @ A: the saved adapter is then right
#: only on that changed base (PEFT converts it with save_pretrained(path_initial_model_for_weight_conversion=...), which
#: the job does not do), and DPO's reference (the adapter disabled) would be the residual, not the model. On a 4-bit
#: base it is worse: PEFT 0.21's pissa_init and mica_init check only the weight's dtype, and the job stores NF4 weights
#: as bfloat16 (bnb_4bit_quant_storage, for FSDP), so they run the SVD on the packed 4-bit bytes; olora_init dequantizes,
#: subtracts and quantizes the residual again, so the model no longer starts as the base model. (tests/test_lora.py)
REFUSED_INITS = {
    "pissa": "starts from the base weights and replaces them with the residual: the saved adapter would only be "
             "right on that changed base, not on JOB_BASE_MODEL (and on a 4-bit base PEFT would decompose the packed "
             "4-bit bytes)",
    "olora": "starts from the base weights and replaces them with the residual (requantized on a 4-bit base): the "
             "saved adapter would only be right on that changed base, not on JOB_BASE_MODEL",
    "corda": "starts from the base weights and replaces them with the residual, after a calibration pass the job "
             "does not run",
    "loftq": "quantizes the base itself from full-precision weights; the job loads the base already quantized",
    "eva": "needs a pass over the data (peft.initialize_lora_eva_weights) that the job does not run",
    "lora_ga": "needs gradients estimated beforehand (peft's preprocess_loraga), which the job does not compute; "
               "without them PEFT silently falls back to the default init",
}
#: ... and those refused on a quantized base only: they read the base weights, which PEFT takes as stored.
REFUSED_INITS_QUANTIZED = {
    "mica": "reads the base weights' singular vectors, and on a quantized base PEFT reads the packed bytes instead",
}


def _init_name(value) -> str | None:
    return value.lower().split("_niter_")[0] if isinstance(value, str) else None


@functools.cache
def _config_fields() -> dict[str, object]:
    """name -> resolved type of every init field of PEFT's LoraConfig."""
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(LoraConfig) if f.init}


def _name_problem(var: str, name: str) -> str | None:
    if name in MANAGED:
        return f"{var}: set by the job; use {MANAGED[name]}"
    fields = _config_fields()
    if name in fields:
        return None
    import difflib

    names = sorted((set(fields) - set(MANAGED)) | set(SHORT_NAMES.values()))
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    hint = f" (did you mean JOB_LORA__{close[0].upper()}?)" if close else ""
    return f"{var}: unknown variable: not a LoRA setting or a field of PEFT's LoraConfig{hint}"


def name_problems(variables: list[tuple[str, str]]) -> list[str]:
    """(variable, field) names beyond the job's own LoRA fields that are not fields of PEFT's LoraConfig."""
    return [p for var, name in variables if (p := _name_problem(var, name))]


def coerce(name: str, raw):
    """A JOB_LORA__ value as a value of its LoraConfig field's type (`a,b` is a list, JSON for dicts); ValueError
    naming the variable when it is not one."""
    from job.trainargs import _coerce

    var = f"JOB_LORA__{name.upper()}"
    problem = _name_problem(var, name)
    if problem:
        raise ValueError(problem)
    tp = _config_fields()[name]
    try:
        value = _coerce(tp, raw)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        msg = errors()[0]["msg"] if callable(errors) else " ".join(str(exc).split())[:300]
        words = [repr(w) for w in _literals(tp)] + (["true", "false"] if bool in typing.get_args(tp) else [])
        msg = f"one of {', '.join(words)}" if words else f"{msg}; PEFT's type: {tp}"
        raise ValueError(f"{var}: invalid value {raw!r} ({msg})") from None
    if dataclasses.is_dataclass(value):  # PEFT's sub-configs (EvaConfig, ...) stay plain data: LoraConfig takes dicts
        value = dataclasses.asdict(value)
    return value


def _literals(tp) -> list:
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return [w for arg in typing.get_args(tp) for w in _literals(arg)]


def config_kwargs(lora, *, quantized: bool = True) -> dict:
    """LoraConfig's arguments for JOB_LORA__*: the job's fields, then every other field the user set, by PEFT's name.
    Raises ValueError("JOB_LORA__NAME: why") for a value PEFT's types or the job refuse."""
    kw = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.modules(), bias="none",
              task_type="CAUSAL_LM")
    for name, raw in (lora.model_extra or {}).items():
        kw[name] = coerce(name, raw)
    init = _init_name(kw.get("init_lora_weights"))
    why = REFUSED_INITS.get(init) or (REFUSED_INITS_QUANTIZED.get(init) if quantized else None)
    if why:
        raise ValueError(f"JOB_LORA__INIT_LORA_WEIGHTS={kw['init_lora_weights']}: not supported: it {why}. Use true "
                         "(PEFT's default), gaussian or orthogonal")
    if init == "orthogonal" and any(r % 2 for r in [lora.r, *(kw.get("rank_pattern") or {}).values()]):
        # PEFT checks this only when it creates the adapter, after the download.
        raise ValueError(f"JOB_LORA__INIT_LORA_WEIGHTS=orthogonal needs an even rank (JOB_LORA__R={lora.r})")
    return kw


def problems(s) -> list[str]:
    """Every problem PEFT's LoraConfig (or the job) has with JOB_LORA__*, each naming its variable; [] when fine."""
    from peft import LoraConfig

    try:
        kw = config_kwargs(s.lora, quantized=s.quant.load_in != "none")
    except ValueError as exc:
        return [str(exc)]
    try:
        LoraConfig(**kw)
        return []
    except Exception as exc:  # noqa: BLE001 - PEFT raises ValueError, TypeError, ImportError ...
        first = " ".join(str(exc).split())[:400] or type(exc).__name__
    culprits = []
    for name in lora_extras(s.lora):  # this one value over the job's defaults: does PEFT refuse it alone?
        try:
            LoraConfig(**{**config_kwargs(type(s.lora)()), name: kw[name]})
        except Exception as exc:  # noqa: BLE001
            culprits.append(f"JOB_LORA__{name.upper()}: PEFT's LoraConfig refused it: {' '.join(str(exc).split())[:400]}")
    return culprits or [f"JOB_LORA__*: PEFT's LoraConfig refused the combination: {first}"]


def lora_extras(lora) -> dict:
    """The LoraConfig fields set by their PEFT name (beyond R, ALPHA, DROPOUT, TARGET_MODULES), as given."""
    return dict(lora.model_extra or {})


def is_default(name: str, value) -> bool:
    """Whether `value` is what PEFT's LoraConfig has for this field when it is not set."""
    from peft import LoraConfig

    field = next((f for f in dataclasses.fields(LoraConfig) if f.name == name), None)
    if field is None:
        return False
    default = field.default_factory() if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING else field.default
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return value == default


def lean_forward_applies(config) -> tuple[bool, str]:
    """Whether the lean forward computes exactly what PEFT's does for adapters of this LoraConfig, and why not.

    It computes `base(x) + B(A(dropout(x))) * scaling`: PEFT's vanilla path, whatever the scaling (rsLoRA's
    alpha / sqrt(r), rank and alpha patterns). Variants are read from PEFT's own metadata, as PEFT resolves them
    (`LoraLayer.resolve_lora_variant`), so a variant added to PEFT later is not taken for plain LoRA."""
    variants = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ()):
            variants.append(f"init_lora_weights={value}")
        elif f.metadata.get("is_lora_variant") and value:
            variants.append(f.name)
    if variants:
        return False, f"the LoRA variant {', '.join(variants)} has its own forward in PEFT"
    if getattr(config, "lora_bias", False):
        return False, "lora_bias: B has a bias"
    return True, "plain LoRA" + (" (rsLoRA scaling)" if getattr(config, "use_rslora", False) else "")


# ---------------------------------------------------------------------------------------------- the lean forward

#: The trainer's LoRA layers get the lean forward (job.stages.common.make_trainer); the bench's `_peft_lora` switch
#: turns it off to measure what it buys.
LEAN = True


def lora_layers(model) -> list:
    """The model's PEFT LoRA linear layers (4-bit bitsandbytes bases and plain ones)."""
    from peft.tuners.lora import Linear

    classes: tuple = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes absent
        pass
    else:
        classes += (Linear4bit,)
    return [m for m in model.modules() if isinstance(m, classes)]


def make_lean(model) -> int:
    """Give every LoRA linear layer of `model` the lean forward (once); returns how many layers got it: none when an
    adapter's config is a variant it is not exact for (lean_forward_applies)."""
    if not all(lean_forward_applies(c)[0] for c in (getattr(model, "peft_config", None) or {}).values()):
        return 0
    n = 0
    for layer in lora_layers(model):
        if "forward" not in layer.__dict__:
            layer.forward = types.MethodType(_lean_forward, layer)
            n += 1
    return n


def undo(model) -> int:
    """Every LoRA layer back to PEFT's forward; returns how many were lean."""
    return sum(layer.__dict__.pop("forward", None) is not None for layer in lora_layers(model))


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or not torch.is_autocast_enabled(x.device.type)):
        return peft_forward(self, x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return peft_forward(self, x, *args, **kwargs)
    base = self.base_layer
    kept = base._buffers.get("_dequantized")
    compute = kept.dtype if kept is not None else getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype != compute or x.dtype != torch.get_autocast_dtype(x.device.type):
        return peft_forward(self, x, *args, **kwargs)

    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a = self.lora_A[name](self.lora_dropout[name](x2))
    b = torch.nn.functional.linear(a, self.lora_B[name].weight * self.scaling[name])  # autocast: in x's dtype
    if kept is not None and base.bias is None:
        b.addmm_(x2, kept.t())  # in-place ops don't autocast: all three are in the compute dtype here
    else:
        b.add_(base(x2))
    return b.view(*shape, b.shape[-1])

"""Tokenizer, prompt format, quantized base model and LoRA adapter.

    >>> tok, fmt = load_tokenizer(Path("/models/llm-jp-3-13b"), None, "auto")
    >>> model = load_base_model(Path("/models/llm-jp-3-13b"), settings)   # NF4 4-bit, bf16 compute
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
from pathlib import Path

import torch

from job.errors import ConfigError, ModelError
from job.settings import JobSettings, LoraSettings, QuantSettings

log = logging.getLogger(__name__)

#: The prompt format when the model has no chat template (the seed notebook's): `### 指示\n{prompt}\n### 回答\n{answer}<eos>`.
#: It is set as the tokenizer's chat template and saved with the adapter, so `tokenizer.apply_chat_template(messages,
#: add_generation_prompt=True)` at inference reproduces exactly what training saw. A system message, if any, comes first.
INSTRUCTION_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{% if not loop.first and messages[loop.index0 - 1]['role'] != 'system' %}\n{% endif %}"
    "### 指示\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### 回答\n{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### 回答\n{% endif %}"
)

#: Only these files are fetched for a base model: weights as safetensors (never pickles), configs, tokenizer.
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "*.tiktoken", "vocab*", "merges.txt", "chat_template*", "config.json",
                   "generation_config.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer*", "special_tokens_map.json", "chat_template*", "prompt_format.json", "*.model"]


def load_tokenizer(model_dir: Path, adapter_dir: Path | None, prompt_format: str, *, eos_token: str | None = None):
    """The tokenizer and the name of the prompt format in use.

    Continuing an adapter (DPO after SFT) reuses the tokenizer saved with it, so both stages use the same format.
    `eos_token` (JOB_TRAIN__EOS_TOKEN) replaces the tokenizer's EOS: it must be one token of the vocabulary.
    """
    from transformers import AutoTokenizer

    source = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").exists() else model_dir
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelError(f"{source}: can't load the tokenizer ({type(exc).__name__}: {exc})") from None
    if eos_token is not None:
        if eos_token not in tok.get_vocab():
            ids = tok(eos_token, add_special_tokens=False)["input_ids"]
            raise ConfigError(f"JOB_TRAIN__EOS_TOKEN={eos_token!r}: not a single token of the tokenizer's vocabulary "
                              f"(it encodes as {len(ids)} tokens); name a special token such as {tok.eos_token!r}")
        tok.eos_token = eos_token
    if tok.eos_token is None:
        raise ModelError(f"{source}: the tokenizer has no EOS token; training examples must end with one (set JOB_TRAIN__EOS_TOKEN)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked out of the loss; any id works
    if source == adapter_dir and tok.chat_template:
        saved = adapter_dir / "prompt_format.json"
        return tok, json.loads(saved.read_text(encoding="utf-8"))["name"] if saved.exists() else "chat_template"
    if prompt_format == "chat_template" and not tok.chat_template:
        raise ModelError(f"{model_dir}: JOB_PROMPT_FORMAT=chat_template but the model has no chat template")
    if prompt_format == "instruction" or not tok.chat_template:
        tok.chat_template = INSTRUCTION_TEMPLATE
        return tok, "instruction"
    return tok, "chat_template"


def quantization_config(q: QuantSettings):
    from transformers import BitsAndBytesConfig

    if q.load_in == "none":
        return None
    if q.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        # Keeps the packed 4-bit weights in the compute dtype, which FSDP needs to shard them; harmless otherwise.
        bnb_4bit_quant_storage=getattr(torch, q.compute_dtype),
    )


def device_for_rank() -> str:
    import os

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


@contextlib.contextmanager
def model_errors(s: JobSettings, doing: str):
    """What transformers raises while reading JOB_BASE_MODEL (its config or its weights), as a ModelError naming it."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"JOB_BASE_MODEL: {s.base_model} needs custom code; set JOB_TRUST_REMOTE_CODE=true if you "
                             "trust it") from None
        raise ModelError(f"JOB_BASE_MODEL: {s.base_model}: {doing}: {exc}") from None
    except OSError as exc:
        raise ModelError(f"JOB_BASE_MODEL: {s.base_model}: {doing}: {exc}") from None


def safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file holds what its header says (a truncated download, a full disk while copying);
    reads the header only."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0) if header else None
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        end = None
    if end is None:
        return f"{path.name} is truncated or damaged ({size} bytes, no valid header)"
    if 8 + n + end != size:
        return f"{path.name} is truncated or damaged ({size} bytes, its header says {8 + n + end})"
    return None


def check_safetensors(model_dir: Path, variable: str, shown: str) -> None:
    """Every *.safetensors file under `model_dir` is whole: a ModelError naming the variable and the file instead of
    the loader's traceback."""
    for path in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ModelError(f"{variable}: {shown}: {problem}: download or copy it again")


def load_base_model(model_dir: Path, settings: JobSettings):
    from transformers import AutoModelForCausalLM

    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"JOB_BASE_MODEL: {settings.base_model}: no *.safetensors weights (pickled .bin/.pt weights are not loaded)")
    from transformers import AutoConfig

    from job import fastpaths

    check_safetensors(model_dir, "JOB_BASE_MODEL", settings.base_model)
    device = device_for_rank()
    with model_errors(settings, "can't load the model"):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
        # Packed rows through variable-length attention where the model and the GPU have what it needs
        # (job/fastpaths.py decides; job/attention.py says why), else transformers' own attention.
        fast = fastpaths.decide(settings, config, device)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=quantization_config(settings.quant),
            dtype=getattr(torch, settings.quant.compute_dtype),
            use_safetensors=True,
            trust_remote_code=settings.trust_remote_code,
            attn_implementation=fast.attention,
            device_map={"": device},
        )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with gradient checkpointing
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking the model's 4-bit weights for its CPU inference kernel; returns the layers
    changed.

    Why: on CPUs with AVX512-BF16 (most current cloud Xeons), bitsandbytes 0.50's `Linear4bit.forward` repacks a
    layer's weight in place the first time it runs in eval mode without grad (the "before" answers, `evaluate()`), and
    from then on computes through `gemv_4bit`, which has no autograd: the gradient through the frozen base is dropped
    with only a warning, so every later training step is wrong (adapters 88% off per layer, resumed runs that differ
    from uninterrupted ones, ranks whose parameter shapes disagree). The flag is per layer and read on every forward,
    so turning it off once after loading keeps every forward on the ordinary, differentiable 4-bit path. Nothing else
    in bitsandbytes repacks (moving or saving a packed weight unpacks it); `unpack_4bit` undoes one that was."""
    layers = four_bit_layers(model)
    changed = 0
    for layer in layers:
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False
            changed += 1
    return changed + unpack_4bit(model)


def unpack_4bit(model) -> int:
    """Put back into bitsandbytes' ordinary layout any 4-bit weight that was repacked for the CPU inference kernel
    (a model loaded elsewhere and run in eval mode before keep_4bit_layout); returns the layers unpacked."""
    unpacked = 0
    for layer in four_bit_layers(model):
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
            unpacked += 1
    return unpacked


def lora_config(lora: LoraSettings, quant: QuantSettings | None = None):
    """PEFT's LoraConfig for JOB_LORA__* (job/lora.py maps every field; the settings were checked when they loaded)."""
    from peft import LoraConfig

    from job.lora import config_kwargs

    return LoraConfig(**config_kwargs(lora, quantized=(quant or QuantSettings()).load_in != "none"))


def load_adapter(model, adapter_dir: Path):
    """The base model with an existing adapter, trainable."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapter weights are not loaded)")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    except Exception as exc:
        raise ModelError(f"{adapter_dir}: the adapter does not fit the base model: {type(exc).__name__}: {exc}") from None


def four_bit_layers(model) -> list:
    """The model's bitsandbytes 4-bit linear layers (inside PEFT's LoRA layers too: they are their `base_layer`)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantized_bytes(model) -> int:
    """What keep_dequantized would add: each 4-bit weight's full shape in its layer's compute dtype."""
    return sum(m.weight.quant_state.shape.numel() * _compute_dtype(m).itemsize for m in four_bit_layers(model))


def keep_dequantized(model) -> int:
    """Give every 4-bit linear layer one copy of its weight dequantized to the compute dtype, used in place of
    bitsandbytes' dequantization in every call; returns the bytes added.

    For a training micro-batch (more than ~1,500 tokens on CUDA, any size on the CPU) bitsandbytes 0.50 computes
    `linear(x, dequantize_4bit(W).to(x.dtype))` in the forward and `grad @ dequantize_4bit(W).to(grad.dtype)` in the
    backward: with the copy, the same products without the dequantize kernels (4% of a 13B step on an H200, plus the
    memory traffic they cause). For a few tokens (generation) bitsandbytes uses a fused 4-bit kernel that rounds
    differently; the copy's plain bf16 product is then the reference one. The copy is a buffer that is never saved
    (state dicts, adapters and checkpoints don't change) and takes no gradient."""
    import bitsandbytes as bnb

    added = 0
    for layer in four_bit_layers(model):
        if "_dequantized" in layer._buffers or getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            continue  # kept already, or repacked by bitsandbytes for its CPU inference kernel (not dequantizable)
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(_compute_dtype(layer))
        layer.register_buffer("_dequantized", weight, persistent=False)
        layer.forward = types.MethodType(_forward_dequantized, layer)
        added += weight.numel() * weight.element_size()
    return added


def _compute_dtype(layer) -> torch.dtype:
    return layer.compute_dtype or layer.weight.quant_state.dtype


def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward with the kept weight: input in the compute dtype, output in the input's."""
    w = self._dequantized
    bias = None if self.bias is None else self.bias.to(w.dtype)
    return torch.nn.functional.linear(x.to(w.dtype), w, bias).to(x.dtype)


def drop_dequantized(model) -> int:
    """Undo keep_dequantized: every layer back to bitsandbytes' own forward; returns the bytes released."""
    freed = 0
    for layer in four_bit_layers(model):
        weight = layer._buffers.pop("_dequantized", None)
        if weight is not None:
            freed += weight.numel() * weight.element_size()
            layer.__dict__.pop("forward", None)  # the class's forward again
    return freed


def kv_cache_bytes_per_token(config) -> int | None:
    """Bytes of KV cache one token of a sequence takes in generation (keys and values, every layer, bf16); None when
    the config does not say."""
    n, h, heads = (getattr(config, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (n, h, heads)):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return 2 * n * kv_heads * head_dim * 2

"""The job's configuration: the only module that reads the environment.

Every setting is a `JOB_` variable; groups nest with `__` (`JOB_LORA__R=16`, `JOB_TRAIN__LEARNING_RATE=1e-4`).
Standard variables keep their standard names and are read by their own clients: `HF_TOKEN`/`HF_HOME` by
huggingface_hub, the AWS credential chain and `AWS_ENDPOINT_URL(_S3)` by boto3.

    >>> from job.settings import load_settings
    >>> s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "hf://llm-jp/llm-jp-3-13b",
    ...                    "JOB_DATA": "s3://bucket/sft.jsonl", "JOB_OUTPUT": "s3://bucket/runs"})
    >>> s.lora.r, s.quant.load_in
    (16, '4bit')
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from job.errors import ConfigError

PREFIX = "JOB_"
DELIM = "__"
#: The container's terminationMessagePath in Kubernetes (its default).
TERMINATION_LOG = "/dev/termination-log"

#: Groups whose variables may name any field of TRL's SFTConfig/DPOConfig (checked by job/trainargs.py).
OPEN_GROUPS = ("train", "dpo")

#: JOB_ variables that others set in our environment: Kubernetes sets JOB_COMPLETION_INDEX in Indexed Jobs.
FOREIGN_VARS = frozenset({"JOB_COMPLETION_INDEX"})

#: Environment variables whose values are secrets: never printed, and redacted from logs if they leak into a message.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_environ: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("job_environ", default=None)


def _auto_true_false(v):
    """`auto`/`true`/`false` settings also take the usual spellings of a boolean (1, yes, on, 0, no, off)."""
    words = {"1": "true", "yes": "true", "on": "true", "true": "true", "0": "false", "no": "false", "off": "false", "false": "false"}
    if isinstance(v, bool):
        return "true" if v else "false"
    return words.get(v.strip().lower(), v.strip().lower()) if isinstance(v, str) else v


#: An `auto`/`true`/`false` setting that also takes the usual spellings of a boolean.
AutoTrueFalse = Annotated[Literal["auto", "true", "false"], BeforeValidator(_auto_true_false)]


class _Group(BaseModel):
    # inf and nan are refused everywhere: `JOB_TRAIN__LEARNING_RATE=inf` would train NaN weights, not fail.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(_Group):
    """`JOB_LORA__*`: the LoRA adapter (ignored when `JOB_ADAPTER` continues an existing one: a warning says so). The
    fields below have the job's defaults and short names; any other field of PEFT's LoraConfig can be set by its name,
    e.g. `JOB_LORA__USE_RSLORA=true`, `JOB_LORA__USE_DORA=true`, `JOB_LORA__INIT_LORA_WEIGHTS=gaussian` (job/lora.py)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    #: SFT only, in effect: DPO turns every dropout off (TRL's disable_dropout), so it is no part of a DPO run's identity.
    dropout: float = Field(0.05, ge=0, lt=1)
    #: Comma-separated module names, or `all-linear` (every linear layer except the output head).
    target_modules: str = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: str) -> str:
        names = [m.strip() for m in v.split(",") if m.strip()]
        if not names:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return ",".join(names)

    @model_validator(mode="after")
    def _typed_extras(self) -> LoraSettings:
        # PEFT fields as values of their LoraConfig types, so that the printed config and the run identity say `true`
        # whatever the spelling; a value that does not convert stays as given, for load_settings to name.
        if self.model_extra:
            from job import lora

            for name, raw in list(self.model_extra.items()):
                try:
                    self.model_extra[name] = lora.coerce(name, raw)
                except ValueError:
                    pass
        return self

    def modules(self) -> str | list[str]:
        return "all-linear" if self.target_modules == "all-linear" else self.target_modules.split(",")


class QuantSettings(_Group):
    """`JOB_QUANT__*`: how the frozen base model is stored. The default is QLoRA's: NF4, double quantization, bf16 compute."""

    load_in: Literal["4bit", "8bit", "none"] = "4bit"
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: Keep one copy of the 4-bit base weights dequantized to COMPUTE_DTYPE on the GPU, instead of dequantizing every
    #: layer again in every forward and backward pass: the same products (the copy is what bitsandbytes dequantizes
    #: to on each call), for 2 bytes per base parameter more (24 GiB at 13B). Never saved: adapters, checkpoints and
    #: merges are the same either way. `auto`: on when gradient checkpointing is off (the GPU has room) and the copy
    #: fits next to the largest micro-batch's activations; off on a CPU. Measured on an H200, 13B SFT:
    #: docs/benchmarks.md, levers 4 and 4b.
    keep_dequantized: AutoTrueFalse = "auto"

    @field_validator("keep_dequantized")
    @classmethod
    def _four_bit_only(cls, v, info):
        if v == "true" and info.data.get("load_in", "4bit") != "4bit":
            raise ValueError(f"a dequantized copy is kept of 4-bit weights only (JOB_QUANT__LOAD_IN={info.data['load_in']})")
        return v


class TrainSettings(_Group):
    """`JOB_TRAIN__*`: passed to TRL's SFTConfig/DPOConfig under the same (transformers/TRL) names. The fields below
    have the job's defaults; any other field of the stage's TRL config can be set by its name (job/trainargs.py)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    #: Overrides the number of epochs when > 0.
    max_steps: int = -1
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    #: Longest training sequence in tokens (SFT: prompt + answer + EOS; DPO: prompt + the longer answer + EOS).
    max_length: int = Field(1024, gt=0)
    #: What happens to an example longer than MAX_LENGTH. `cut_prompt`: keep the whole answer and its EOS, cut the
    #: prompt from its start (after BOS); drop the example only when the answer alone doesn't fit. `drop`: drop it.
    #: Either way the run reports how many were cut or dropped, and which rows first (log, metrics.json, --check).
    over_length: Literal["cut_prompt", "drop"] = "cut_prompt"
    #: The token that ends each answer, when it is not the tokenizer's EOS (e.g. `<|im_end|>` for a ChatML template on
    #: a base model's tokenizer): it becomes the tokenizer's EOS, is trained at the end of every answer, and is what
    #: generation must stop on. TRL's `eos_token`.
    eos_token: str | None = None
    #: Share of the total steps the learning rate warms up over, below 1 (for a number of steps, WARMUP_STEPS).
    warmup_ratio: float = Field(0.03, ge=0)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    #: `auto`: fused AdamW on a GPU (LoRA's optimizer state is small), plain AdamW on CPU. Any transformers name works,
    #: e.g. `paged_adamw_8bit` for the low-memory setting.
    optim: str = "auto"
    #: LoRA+ (PEFT's create_loraplus_optimizer): LoRA's B matrices learn at this many times LEARNING_RATE, A at
    #: LEARNING_RATE (the LoRA+ paper suggests 16, with a learning rate about half of plain LoRA's). Unset: one learning
    #: rate for both. With OPTIM's optimizer, whichever it is. A job setting: TRL has no such field.
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    #: Steps between uploaded checkpoints (the unit of work a spot reclaim can lose); 0 turns them off.
    save_steps: int = Field(100, ge=0)
    #: Steps between evaluations when there is eval data; 0 evaluates once, at the end.
    eval_steps: int = Field(0, ge=0)
    #: `none`, or a comma-separated list of integrations (`tensorboard`, `wandb`, `mlflow`, ...).
    report_to: str = "none"
    #: Recompute activations in the backward pass instead of keeping them: a third more compute for a fraction of the
    #: memory. `auto`: job/memplan.py's memory plan decides, with the three settings below, once the model is loaded:
    #: the fastest combination whose estimated peak (from the model's shape and this run's real example lengths) fits
    #: the GPU's free memory; always on without a GPU. `metrics.json` `memory_plan` says what was chosen, over what, and
    #: the estimated against the measured peak (docs/benchmarks.md, "The memory plan").
    gradient_checkpointing: AutoTrueFalse = "auto"
    #: With gradient checkpointing on a GPU, keep what checkpointing saves of each layer (its input) in pinned CPU
    #: memory until the backward pass, copied out and back alongside the computation (job/offload.py): a 13B keeps
    #: 400 KiB less GPU memory per token of a micro-batch, room for a micro-batch twice as large at the same peak.
    #: `auto`: the memory plan's choice (where memory is short, a larger micro-batch with it beats a smaller one
    #: without). Not part of the run identity. Measured, 13B SFT: docs/benchmarks.md, lever 16.
    offload_checkpoints: AutoTrueFalse = "auto"
    #: Run each optimizer step's PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS rows in fewer, larger
    #: micro-batches: the same rows and the same gradient per step (SFT's loss is normalised over the whole step; DPO's
    #: per-micro-batch means are equal-sized, except that a last, partial step weighs its pairs evenly), fewer passes
    #: through the model. `auto`: the memory plan's choice among the set size times each divisor of the accumulation,
    #: for micro-batches without padding (packed SFT, padding-free DPO; with several GPUs, the smallest any of them
    #: chose); the first thing a run that runs out of memory gives back. (Padded micro-batches, unpacked SFT and
    #: `JOB_TRAIN__PACKING=false` DPO, pad to their longest row, so a larger one also pads more: `auto` leaves them as
    #: set.) `true`: the whole step in one micro-batch, any stage. `false`: exactly as set. Not part of the run
    #: identity (how, not what, is trained): a pod that resumes on another GPU may split steps differently. Measured,
    #: 13B: docs/benchmarks.md, levers 10-12.
    merge_micro_batches: AutoTrueFalse = "auto"
    #: SFT: pack several examples into one row (no attention across examples; padding-free). DPO: run each
    #: micro-batch's rows as one row without padding (job/padfree.py). Either way no padding is computed.
    packing: bool = True
    #: Use Liger's fused kernels (fused linear cross-entropy) when the package is installed and a GPU is present.
    use_liger_kernel: bool = True
    #: bf16 autocast for the trainable parts; `auto` = on when the GPU supports it.
    bf16: Literal["auto", "true", "false"] = "auto"

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup_ratio(cls, v: float) -> float:
        # It is passed on as transformers' warmup_steps, which reads a value >= 1 as a number of steps.
        if v >= 1:
            raise ValueError("must be below 1 (a share of the total steps); for a number of warm-up steps set "
                             "JOB_TRAIN__WARMUP_STEPS instead")
        return v

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: str) -> str:
        return ",".join(x.strip() for x in v.split(",") if x.strip()) or "none"


class DpoSettings(_Group):
    """`JOB_DPO__*`: DPO-only settings (TRL names); any other field of TRL's DPOConfig can be set by its name."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"


class MergeSettings(_Group):
    """`JOB_MERGE__*`: JOB_STAGE=merge only (job/stages/merge.py)."""

    #: The 16-bit base the adapter is merged into. `dequantized`: JOB_BASE_MODEL quantized with the JOB_QUANT__*
    #: settings (set them as the run that trained the adapter did) and dequantized to COMPUTE_DTYPE: the weights the
    #: adapter was trained and evaluated with. `original`: the checkpoint's own weights, without the quantization error
    #: the adapter was trained around.
    base: Literal["dequantized", "original"] = "dequantized"


class ColumnSettings(_Group):
    """`JOB_COLUMNS__*`: names of the columns in your data when they differ from the recognised ones."""

    prompt: str | None = None
    completion: str | None = None
    input: str | None = None
    messages: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ColumnSettings:
        # Two roles on one column train the answer on itself (prompt = completion) or prefer an answer to itself.
        roles: dict[str, list[str]] = {}
        for role, column in self:
            if column is not None:
                roles.setdefault(column, []).append(f"{PREFIX}COLUMNS{DELIM}{role.upper()}")
        same = [f"{' and '.join(names)} both name column {column!r}" for column, names in roles.items() if len(names) > 1]
        if same:
            raise ValueError("; ".join(same) + ": each role needs a column of its own")
        return self


class JobSettings(BaseSettings):
    """All of a run's settings. Required variables have no default."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_nested_delimiter=DELIM,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
    )

    #: What `load_settings(trl="later")` left to `check_library_settings`: the names beyond the job's own fields in
    #: JOB_TRAIN__/JOB_DPO__ and in JOB_LORA__ (None: nothing left).
    _library_checks: tuple[list[tuple[str, str, str]], list[tuple[str, str]]] | None = PrivateAttr(default=None)

    #: `merge`: JOB_ADAPTER merged into JOB_BASE_MODEL loaded in 16 bits (job/stages/merge.py); it reads no data.
    stage: Literal["sft", "dpo", "merge"]
    #: `hf://org/model[@revision]` (or `org/model`), `s3://bucket/prefix/`, or a local directory.
    base_model: str
    #: A file or prefix: `s3://bucket/key`, `s3://bucket/prefix/`, `hf://datasets/org/name[@revision]`, local path.
    #: Required except for `merge` (see _stage_inputs).
    data: str | None = None
    #: Where `{run_id}/` is written: `s3://bucket/prefix`, `hf://org/repo`, or a local directory.
    output: str
    eval_data: str | None = None
    #: The largest share of the training (or eval) examples that JOB_TRAIN__MAX_LENGTH may cut or drop
    #: (JOB_TRAIN__OVER_LENGTH); above it the run fails before the download (exit 3), naming the lengths that would
    #: fit. 1 allows any share.
    max_over_length_share: float = Field(0.1, ge=0, le=1)
    #: Held-out fraction of JOB_DATA used for evaluation when JOB_EVAL_DATA is not set.
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    #: Prompts answered before and after training (generations.jsonl/.md): a file or URI like JOB_DATA (a prompt column,
    #: any SFT record format, or .txt with one prompt per line), or `none`. Default: 8 records of the eval/training data.
    eval_prompts: str | None = None
    #: Longest generated answer, in new tokens.
    eval_max_new_tokens: int = Field(256, gt=0)
    #: Start from this existing adapter (for DPO after SFT it is also the frozen reference).
    adapter: str | None = None
    run_id: str | None = None
    #: Discard what an earlier run with this JOB_RUN_ID left (checkpoints, outputs, its recorded identity) and start over.
    #: Without it, a run id already used for another stage, config or data is refused (exit 2).
    restart: bool = False
    #: With JOB_RESTART=true: start over once for this key, not on every attempt. A retried attempt with the same key
    #: (a Kubernetes pod retry: k8s/base/job.yaml sets it to the Job's uid) continues the restarted run; a new key
    #: restarts again. Unset: every start with JOB_RESTART=true starts over.
    restart_key: str | None = None
    #: `auto`: the model's chat template if it has one, else the `instruction` format
    #: (`### 指示\n{prompt}\n### 回答\n{answer}<eos>`). `chat_template` requires the model's template.
    prompt_format: Literal["auto", "chat_template", "instruction"] = "auto"
    #: Local scratch directory for downloads and checkpoints.
    workdir: str = Field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "qlora-job"))
    #: Keep this run's scratch files (outputs, checkpoints, weights) in JOB_WORKDIR after they were uploaded.
    keep_workdir: bool = False
    #: Seconds a run's lock (`{run}/_LOCK` in JOB_OUTPUT) stays valid without its heartbeat: a run that died holds its
    #: run id this long at most (job/runlock.py).
    lock_ttl: int = Field(300, ge=10)
    #: The attempts of one Kubernetes Job (the manifests set it to the Job's uid): a later attempt takes over the run
    #: lock of an earlier one at once instead of waiting JOB_LOCK_TTL (attempts of one Job never overlap).
    attempt_group: str | None = None
    #: Where the failure's one-line reason goes (Kubernetes' terminationMessagePath). The default is written only
    #: where it exists (the kubelet mounts it).
    termination_log: str = TERMINATION_LOG
    trust_remote_code: bool = False
    #: `auto`: a progress bar on a terminal, JSON lines otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"
    lora: LoraSettings = LoraSettings()
    quant: QuantSettings = QuantSettings()
    train: TrainSettings = TrainSettings()
    dpo: DpoSettings = DpoSettings()
    merge: MergeSettings = MergeSettings()
    columns: ColumnSettings = ColumnSettings()
    #: A Hub repository the job creates for JOB_OUTPUT=hf://org/repo is private unless this is false.
    hub_private: bool = True
    #: Read from the standard `HF_TOKEN`; passed to huggingface_hub explicitly and never printed.
    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))

    @field_validator("hf_token", mode="before")
    @classmethod
    def _hf_token(cls, v):
        # As huggingface_hub cleans the HF_TOKEN it reads itself (utils/_auth.py's _clean_token): a token from a file
        # or `echo` (a Kubernetes secret made with --from-file) ends with a newline, which no HTTP header may hold;
        # passed on as it was, every Hub request failed as "can't be reached".
        if isinstance(v, str):
            v = v.replace("\r", "").replace("\n", "").strip() or None
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)")
        return v

    @field_validator("base_model", "data", "output", "eval_data", "adapter", "eval_prompts")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from job.storage import parse_uri  # the URI grammar lives with the code that uses it

        parse_uri(v.strip())  # raises ValueError with the reason
        return v.strip()

    @field_validator("data", "adapter")
    @classmethod
    def _stage_inputs(cls, v: str | None, info) -> str | None:
        # A field validator (validate_default=True runs it when the variable is unset), so that a missing JOB_DATA is
        # reported with every other problem, by its name. `stage` is declared first, so it is in info.data.
        stage = info.data.get("stage")
        if info.field_name == "data" and v is None and stage != "merge":
            raise ValueError(f"required for JOB_STAGE={stage}, not set" if stage else "required, not set")
        if info.field_name == "adapter" and v is None and stage == "merge":
            raise ValueError("required for JOB_STAGE=merge (the adapter to merge into JOB_BASE_MODEL), not set")
        return v

    @model_validator(mode="after")
    def _cross(self) -> JobSettings:
        if self.eval_data and self.eval_fraction:
            raise ValueError("set JOB_EVAL_DATA or JOB_EVAL_FRACTION, not both")
        return self

    def resolved_run_id(self) -> str:
        return self.run_id or default_run_id()

    def masked(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets replaced by '***' (what --print-config and run.json show)."""
        data = self.model_dump(mode="json")
        data["hf_token"] = "***" if self.hf_token else None
        return data


def termination_log_path(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """JOB_TERMINATION_LOG, read alone (the failure may be that the other settings don't load): (path, set explicitly)."""
    environ = os.environ if environ is None else environ
    value = next((v for k, v in environ.items() if k.upper() == PREFIX + "TERMINATION_LOG" and v), None)
    return (value, True) if value else (TERMINATION_LOG, False)


def default_run_id(now: datetime | None = None) -> str:
    """Unique and sortable: UTC time to the second plus 6 random hex digits."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class _MappingEnvSource(EnvSettingsSource):
    """The env source, reading the mapping given to load_settings (os.environ by default)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = _environ.get()
        if env is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in env.items() if not (self.env_ignore_empty and v == "")}


def _settings_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
    return (init_settings, _MappingEnvSource(settings_cls))


JobSettings.settings_customise_sources = classmethod(_settings_sources)  # type: ignore[assignment]


def _known_env_names() -> set[str]:
    names = set()
    for name, field in JobSettings.model_fields.items():
        if name == "hf_token":
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names.add(f"{PREFIX}{name}".upper())  # a whole group as JSON is allowed by pydantic-settings
            names.update(f"{PREFIX}{name}{DELIM}{sub}".upper() for sub in ann.model_fields)
        else:
            names.add(f"{PREFIX}{name}".upper())
    return names


def _env_name(loc: tuple) -> str:
    if loc and loc[0] == "hf_token":
        return "HF_TOKEN"
    return PREFIX + DELIM.join(str(p) for p in loc).upper()


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def load_settings(environ: Mapping[str, str] | None = None, *, trl: bool | Literal["later"] = True) -> JobSettings:
    """Build the settings from `environ` (default: the process environment).

    Raises ConfigError naming every missing, invalid or unknown JOB_ variable at once; values of secret
    variables and of unknown variables (a mistyped secret, say) are never included. The JOB_TRAIN__*/JOB_DPO__*/
    JOB_LORA__* names and values beyond the job's own fields are checked against TRL's and PEFT's config classes,
    which imports the training stack (torch, transformers, PEFT, TRL: 10-20 s): `trl=True` does that here;
    `trl="later"` (a run and --check) leaves it to `check_library_settings`, which job/preflight.py calls once the
    storage and the data are checked, so that their mistakes are reported in about a second; `trl=False`
    (--print-config) skips it and logs the variables it leaves unchecked.
    """
    env = dict(os.environ if environ is None else environ)
    problems, trl_names, lora_names = _scan(env)
    token = _environ.set(env)
    try:
        settings = JobSettings()
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                continue  # already reported as unknown above, by its variable name
            name = _env_name(loc) if loc else "configuration"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "required, not set"
            elif loc and loc[0] != "hf_token" and isinstance(err.get("input"), (str, int, float)):
                msg += f" (got {err['input']!r})"
            problems.append(f"{name}: {msg}")
        settings = None
    finally:
        _environ.reset(token)
    if trl is True or (trl == "later" and problems):
        # Every name at once with the problems above (importing TRL or PEFT costs seconds: only when such names are
        # set); "later" leaves them to the preflight only when nothing else is wrong.
        problems += _library_name_problems(env.get(f"{PREFIX}STAGE"), trl_names, lora_names)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    assert settings is not None
    if trl is False:
        for name, _, _ in trl_names:
            logging.getLogger("job").warning("%s: passed to TRL, not checked here (--check and a run check it)", name)
        for name, _ in lora_names:
            logging.getLogger("job").warning("%s: passed to PEFT's LoraConfig, not checked here (--check and a run check "
                                             "it)", name)
    elif trl is True:
        _check_library_values(settings)
    else:
        settings._library_checks = (trl_names, lora_names)
    return settings


def check_library_settings(settings: JobSettings) -> None:
    """What `load_settings(trl="later")` left, if anything: every JOB_TRAIN__*/JOB_DPO__* and JOB_LORA__* name beyond
    the job's own fields, then every value, through TRL's and PEFT's own config classes (imports them). Raises
    ConfigError naming each variable."""
    if settings._library_checks is None:
        return
    trl_names, lora_names = settings._library_checks
    problems = _library_name_problems(settings.stage, trl_names, lora_names)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    _check_library_values(settings)
    settings._library_checks = None


def _scan(env: dict) -> tuple[list[str], list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(unknown JOB_ variables, (variable, group, field) in JOB_TRAIN__/JOB_DPO__ beyond our fields, (variable, field)
    in JOB_LORA__ beyond our fields): the last two are maybe TRL's or PEFT's fields, checked against their classes."""
    known = _known_env_names()
    problems: list[str] = []
    trl_names: list[tuple[str, str, str]] = []
    lora_names: list[tuple[str, str]] = []
    for name in sorted(k for k in env if k.upper().startswith(PREFIX)):
        if name.upper().startswith(f"{PREFIX}LORA{DELIM}") and name.upper() not in known:
            lora_names.append((name, name[len(f"{PREFIX}LORA{DELIM}"):].lower()))
            continue
        group = next((g for g in OPEN_GROUPS if name.upper().startswith(f"{PREFIX}{g}{DELIM}".upper())), None)
        if group:
            if name.upper() not in known:  # maybe a field of TRL's config: checked against it below
                trl_names.append((name, group, name[len(PREFIX) + len(group) + len(DELIM):].lower()))
            continue
        if name.upper() not in known and name.upper() not in FOREIGN_VARS:
            problems.append(f"{name}: unknown variable{_suggest(name.upper(), known)}")
    return problems, trl_names, lora_names


def _library_name_problems(stage: str | None, trl_names: list[tuple[str, str, str]],
                           lora_names: list[tuple[str, str]]) -> list[str]:
    problems = []
    if lora_names:  # job.lora imports torch and PEFT
        from job import lora

        problems += lora.name_problems(lora_names)
    if trl_names:
        from job import trainargs

        stage = str(stage or "").strip().lower()
        problems += trainargs.name_problems(trl_names, stage if stage in ("sft", "dpo") else None)
    return problems


def _check_library_values(settings: JobSettings) -> None:
    from job import lora, trainargs

    problems = lora.problems(settings) + trainargs.problems(settings)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the standard secret variables present, for redacting logs and errors."""
    env = os.environ if environ is None else environ
    values = [env[k] for k in SECRET_ENV_VARS if env.get(k) and len(env[k]) >= 4]
    return values + [v.strip() for v in values if v.strip() != v and len(v.strip()) >= 4]  # as used: see _hf_token

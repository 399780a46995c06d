"""Every check that can run before the weights are downloaded or a GPU warms up. `run` and `--check` call the same
function, so `--check` (the Kubernetes init-container gate) fails on exactly what the run would fail on.

In order, cheapest and most common mistakes first (the settings themselves were checked when they were loaded; a
run and --check load them with `trl="later"`, which leaves TRL's and PEFT's own checks to `libraries` below):
1. scratch and output are writable: a probe under JOB_WORKDIR and under the run's output prefix;
2. the data is pulled, read and validated row by row (file and row in every error); these two need no training
   library, so their mistakes (and the settings') are reported in well under a second; then `libraries`: the
   training stack's import (10-20 s) and the JOB_TRAIN__/JOB_DPO__/JOB_LORA__ settings only TRL and PEFT can check;
3. the base model and adapter are identified without their weights (Hub commit, S3 ETags, local files), and their
   small files fetched: tokenizer, config.json, generation_config.json, the adapter;
4. the model's modules, built on the meta device from config.json: JOB_LORA__TARGET_MODULES must name some, and
   JOB_ADAPTER must fit them (shapes from its safetensors header);
5. run identity: a JOB_RUN_ID used before must be the same stage, config, data and model (else exit 2);
6. sequences: prompt format, the EOS check and the length policy (job/sequences.py), and the planned steps;
7. on a GPU, the memory plan `auto` is expected to choose (job/memplan.py, from the meta modules and the fitted rows):
   a model whose weights and smallest plan can't fit in the GPU's free memory is refused (exit 5) before its download.

    >>> plan = prepare(settings, run_id="sft-v1")     # raises ConfigError / DataError / ModelError, naming the variable
    >>> plan.state, plan.train.report["dropped"]
    ('new', 0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from job import data, sequences, storage
from job.errors import ConfigError, DataError, JobError, ModelError, Preempted
from job.settings import JobSettings

log = logging.getLogger("job")

IDENTITY = "identity.json"
#: Written after a JOB_RESTART wipe: the JOB_RESTART_KEY it was done for (see restart_wanted).
RESTARTED = "restarted.json"

#: Settings that don't change what is trained: a rerun may change them and still continue the same run.
OPERATIONAL = {"workdir", "log_format", "run_id", "restart", "restart_key", "hf_token", "output", "eval_prompts",
               "eval_max_new_tokens", "hub_private", "max_over_length_share", "keep_workdir", "lock_ttl",
               "termination_log", "attempt_group"}
#: How a step is computed, not what it computes: a retried pod on another GPU type may choose differently.
OPERATIONAL_TRAIN = {"save_steps", "logging_steps", "report_to", "per_device_eval_batch_size", "eval_steps",
                     "merge_micro_batches", "offload_checkpoints"}
#: Settings added after runs were already recorded: in a run's identity only when set, so that a run started before
#: they existed (a spot run retried on a newer image) is still the same run.
ONLY_WHEN_SET_TRAIN = {"loraplus_lr_ratio"}


@dataclass
class Inputs:
    """What the run read, and how to recognise it again (run.json's `inputs`)."""

    train: list[dict]
    eval: list[dict]
    identity: dict = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)  # each file read: name, format, records


@dataclass
class Plan:
    run_id: str
    remote: storage.Uri
    workdir: Path
    inputs: Inputs
    models: Models
    base_dir: Path  # holds the small files now; the weights join them later
    adapter_dir: Path | None
    model_identity: dict
    tokenizer: object
    prompt_format: str
    stops: set[int]
    prompts: list  # evaluate.Prompt: what the starting and the trained model answer
    train: sequences.Fitted
    eval: sequences.Fitted | None
    identity: dict
    #: new: nothing recorded for this run id; resume: same identity, checkpoints may exist; succeeded: already done
    state: str
    report: dict


def token(s: JobSettings) -> str | None:
    return s.hf_token.get_secret_value() if s.hf_token else None


# ------------------------------------------------------------------------------------------------- 1. writable


def check_writable(s: JobSettings, remote: storage.Uri, workdir: Path, *, output: bool = True, dry: bool = False) -> None:
    out = storage.parse_uri(s.output)
    if isinstance(out, storage.LocalUri):  # scratch files would be published, or outputs deleted with the scratch files
        w, o = Path(s.workdir).resolve(), out.path.resolve()
        if w == o or w.is_relative_to(o) or o.is_relative_to(w):
            raise ConfigError(f"JOB_WORKDIR={s.workdir} and JOB_OUTPUT={s.output} overlap: the scratch directory and the "
                              "outputs must not contain each other; give them separate directories")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-probe"
        probe.write_bytes(b"probe\n")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"JOB_WORKDIR: {s.workdir}: can't write scratch files there ({exc.strerror or exc}); "
                          "set JOB_WORKDIR to a writable directory (a volume in a container)") from None
    if not output:  # only the process that uploads (rank 0) probes the output
        return
    # The Hub's checks concern the repository (created now if missing); elsewhere a probe under the run's prefix.
    target = storage.parse_uri(s.output) if isinstance(remote, storage.HfUri) else remote
    try:
        storage.probe_write(target, token(s), private=s.hub_private, dry=dry)
    except OSError as exc:
        raise ConfigError(f"JOB_OUTPUT: {s.output}: can't write {remote} ({exc.strerror or exc})") from None
    except DataError as exc:  # e.g. the bucket does not exist
        raise ConfigError(f"JOB_OUTPUT: {exc}") from None
    except JobError as exc:
        exc.args = (f"JOB_OUTPUT: {exc}",)
        raise


# ------------------------------------------------------------------------------------------------- 2. data


def read_data(s: JobSettings, workdir: Path) -> Inputs:
    """Pull and validate the training (and eval) data. Raises DataError naming file and row."""
    identity, sets, files = {}, {}, []
    for role, variable, uri_text in (("train", "JOB_DATA", s.data), ("eval", "JOB_EVAL_DATA", s.eval_data)):
        if not uri_text:
            continue
        try:
            path, ident = storage.pull(storage.parse_uri(uri_text), workdir / "data" / role, token=token(s))
            ident["sha256"] = {name: storage.sha256(p) for p, name in data.data_files(path, uri_text)}
            report: list = []
            sets[role] = data.load_records(path, uri_text, s.stage, s.columns, report=report)
        except (PermissionError, IsADirectoryError) as exc:  # the file's own state, not the disk's: a data problem
            raise DataError(f"{variable}: {exc.filename or uri_text}: can't read it ({exc.strerror}); make it readable "
                            f"by the job's user (uid {os.getuid()})") from None
        except DataError as exc:
            raise DataError(f"{variable}: {exc}{_quoted_hint(uri_text)}") from None
        except JobError as exc:
            raise _named(variable, exc) from None
        identity[role] = ident
        files += [{"role": role, **f} for f in report]
    train, held_out = data.split_eval(sets["train"], s.eval_fraction, s.train.seed)
    return Inputs(train=train, eval=sets.get("eval", held_out), identity=identity, files=files)


def _quoted_hint(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return (f" (the value itself starts and ends with {value[0]}: docker --env-file, Kubernetes and .env files keep "
                "quotes as part of the value; remove them)")
    return ""


# ------------------------------------------------------------------------------------------------- 3-4. model


def _named(variable: str, exc: JobError) -> JobError:
    """`exc` (storage's error: it names the URI, not the setting) with the variable in front, same exit code."""
    if isinstance(exc, Preempted) or str(exc).startswith(variable):
        return exc
    named = type(exc)(f"{variable}: {exc}")
    return named


def _pull_small(variable: str, uri: storage.Uri, dest: Path, include: list[str], tok: str | None) -> Path:
    try:
        path, _ = storage.pull(uri, dest, include=include, token=tok)
    except DataError as exc:  # storage can't tell a model from data: missing here is a model problem (exit 4)
        raise ModelError(f"{variable}: {exc}") from None
    except JobError as exc:
        raise _named(variable, exc) from None
    return path


def identify_models(s: JobSettings) -> tuple[storage.Uri, dict, storage.Uri | None, dict | None]:
    from job.model import ADAPTER_FILES, MODEL_FILES

    def ident(variable, text, include):
        uri = storage.as_model_uri(text)
        try:
            found = storage.identify(uri, include, token(s))
        except DataError as exc:
            raise ModelError(f"{variable}: {exc}") from None
        except JobError as exc:
            raise _named(variable, exc) from None
        return storage.parse_uri(found.pop("pinned")) if "pinned" in found else uri, found

    base_uri, base = ident("JOB_BASE_MODEL", s.base_model, MODEL_FILES)
    names = base.pop("files") if "revision" in base else base["files"]  # a Hub commit pins every file already
    if names is not None and not any(n.endswith(".safetensors") for n in names):  # None: offline, the cache decides
        raise ModelError(f"JOB_BASE_MODEL: {s.base_model} has no *.safetensors weights (pickled .bin/.pt weights are "
                         "not loaded)" + ("" if names else ": no model files at all"))
    if not s.adapter:
        return base_uri, base, None, None
    adapter_uri, adapter = ident("JOB_ADAPTER", s.adapter, ADAPTER_FILES)
    names = adapter.pop("files") if "revision" in adapter else adapter["files"]
    if names is None:  # offline: the cache has it or the pull fails with a clear error
        return base_uri, base, adapter_uri, adapter
    if "adapter_config.json" not in names:
        raise ModelError(f"JOB_ADAPTER: {s.adapter} is not a PEFT adapter (no adapter_config.json in it)")
    if "adapter_model.safetensors" not in names:
        raise ModelError(f"JOB_ADAPTER: {s.adapter} has no adapter_model.safetensors (pickled adapter weights are not loaded)")
    return base_uri, base, adapter_uri, adapter


@dataclass
class Models:
    """The base model and adapter, identified and checked; only their small files are local yet."""

    base_uri: storage.Uri  # pinned to the identified revision
    base_dir: Path
    adapter_dir: Path | None
    identity: dict
    #: job/fastpaths.py's decision for this model on this process's device (a model it can't train right is refused)
    fast: object = None
    #: the base model's modules on the meta device (no memory, no weights)
    meta: object = None


def check_models(s: JobSettings, workdir: Path) -> Models:
    """Steps 3-4: identify the base model and adapter, fetch their small files (tokenizer, configs, the adapter), and
    check the modules on the meta device. Nothing of the base's weights is downloaded."""
    from job.model import ADAPTER_FILES, TOKENIZER_FILES

    base_uri, base_ident, adapter_uri, adapter_ident = identify_models(s)
    base_dir = _pull_small("JOB_BASE_MODEL", base_uri, workdir / "model", TOKENIZER_FILES, token(s))
    adapter_dir = _pull_small("JOB_ADAPTER", adapter_uri, workdir / "adapter", ADAPTER_FILES, token(s)) if adapter_uri else None
    meta = meta_model(s, base_dir)
    check_target_modules(s, meta)
    if adapter_dir:
        check_adapter_fits(s, meta, adapter_dir)
    from job import fastpaths
    from job.model import device_for_rank

    fast = fastpaths.decide(s, meta.config, device_for_rank(), cls=type(meta))
    return Models(base_uri, base_dir, adapter_dir, {"base_model": base_ident, "adapter": adapter_ident}, fast, meta)


def pull_weights(s: JobSettings, models: Models) -> Path:
    """The base model's weights (safetensors only) beside its small files, at the revision identified before."""
    from job.model import MODEL_FILES

    return _pull_small("JOB_BASE_MODEL", models.base_uri, models.base_dir, MODEL_FILES, token(s))


def meta_model(s: JobSettings, model_dir: Path):
    """The base model's architecture on the meta device (no memory, no weights): its modules, from config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from job.model import model_errors

    with model_errors(s, "can't read its config.json"):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=s.trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=s.trust_remote_code)


def _linear_names(model) -> dict[str, object]:
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_target_modules(s: JobSettings, model) -> None:
    wanted = s.lora.modules()
    if wanted == "all-linear" or s.adapter:  # a continued adapter brings its own modules
        return
    linear = _linear_names(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
    every = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [m for m in wanted if m not in every and not any(n == m or n.endswith("." + m) for n in linear)]
    if missing:
        raise ConfigError(f"JOB_LORA__TARGET_MODULES: {', '.join(repr(m) for m in missing)} not found in "
                          f"{type(model).__name__}; its linear layers are {', '.join(kinds)} (or use all-linear)")
    # A name can match a container (self_attn, mlp) that LoRA can't adapt: PEFT decides what it supports, so let it
    # adapt the meta model (no memory) exactly as the run will, and report what it refuses.
    import copy

    from peft import inject_adapter_in_model

    from job.model import lora_config

    try:
        inject_adapter_in_model(lora_config(s.lora), copy.deepcopy(model), low_cpu_mem_usage=True)
    except ValueError as exc:
        kind = re.match(r"Target module (\w+)", str(exc))
        names = [m for m in wanted if kind and any((n == m or n.endswith("." + m)) and type(mod).__name__ == kind.group(1)
                                                   for n, mod in model.named_modules())]
        raise ConfigError(f"JOB_LORA__TARGET_MODULES: {', '.join(map(repr, names)) or s.lora.target_modules} "
                          f"{'is' if len(names) < 2 else 'are'} {kind.group(1) if kind else 'a module'} "
                          f"{'layers' if len(names) > 1 else 'layer'}, which LoRA can't adapt (PEFT: "
                          f"{str(exc).splitlines()[-1].strip()}); name linear layers: {', '.join(kinds)} "
                          "(or use all-linear)") from None


def check_adapter_fits(s: JobSettings, model, adapter_dir: Path) -> None:
    """Every LoRA matrix of the adapter must sit on a linear layer of this base with matching in/out features."""
    from safetensors import safe_open

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"JOB_ADAPTER: {s.adapter}: unreadable adapter_config.json ({exc})") from None
    if config.get("peft_type") not in (None, "LORA"):
        raise ModelError(f"JOB_ADAPTER: {s.adapter} is a {config.get('peft_type')} adapter; the job trains LoRA adapters")
    modules = dict(model.named_modules())
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(f"JOB_ADAPTER: {s.adapter}: adapter_model.safetensors is not readable ({type(exc).__name__})") from None
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        path = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(path)
        if module is None or not hasattr(module, "in_features"):
            raise ModelError(f"JOB_ADAPTER: {s.adapter} does not fit JOB_BASE_MODEL={s.base_model}: it adapts "
                             f"{path!r}, which the base model does not have as a linear layer")
        expected = module.in_features if ".lora_A." in key else module.out_features
        got = shape[1] if ".lora_A." in key else shape[0]
        if got != expected:
            raise ModelError(f"JOB_ADAPTER: {s.adapter} does not fit JOB_BASE_MODEL={s.base_model}: {path} has "
                             f"{'in' if '.lora_A.' in key else 'out'}_features {expected}, the adapter {got}")


# ------------------------------------------------------------------------------------------------- 5. identity


def lora_dropout_ignored(s: JobSettings) -> bool:
    """DPO with TRL's `disable_dropout` (its default) sets every dropout of the model to 0, LoRA's included."""
    from job import trainargs

    return s.stage == "dpo" and bool(trainargs.stage_kwargs(s).get("disable_dropout", True))


def identity(s: JobSettings, inputs: Inputs, model_identity: dict) -> dict:
    config = {k: v for k, v in s.masked().items() if k not in OPERATIONAL}
    config["train"] = {k: v for k, v in config["train"].items()
                       if k not in OPERATIONAL_TRAIN and not (k in ONLY_WHEN_SET_TRAIN and v is None)}
    from job import lora

    # LoRA variants (JOB_LORA__USE_DORA, ...) are what is trained; one set to PEFT's default is the same run as unset.
    config["lora"] = {k: v for k, v in config["lora"].items() if k in type(s.lora).model_fields or not lora.is_default(k, v)}
    if s.stage != "dpo":
        config.pop("dpo")
    config.pop("merge", None)  # JOB_MERGE__* concerns a later merge of the adapter, not what this run trains
    if lora_dropout_ignored(s):  # a setting that changes nothing must not make a retry "another run"
        config["lora"].pop("dropout")
    ident = {
        "stage": s.stage,
        "config": config,
        "data": {role: v["sha256"] for role, v in inputs.identity.items() if role in ("train", "eval")},
        "base_model": {k: v for k, v in model_identity["base_model"].items() if k != "uri"} | {"uri": s.base_model},
        "adapter": None if not model_identity.get("adapter") else
                   {k: v for k, v in model_identity["adapter"].items() if k != "uri"} | {"uri": s.adapter},
    }
    ident["sha256"] = fingerprint(ident)
    return ident


def fingerprint(ident: dict) -> str:
    body = {k: v for k, v in ident.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}__"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict, new: dict) -> list[str]:
    """What makes two run identities differ, in the user's words (variables, files)."""
    out = []
    if old.get("stage") != new.get("stage"):
        out.append(f"JOB_STAGE {old.get('stage')} -> {new.get('stage')}")
    a, b = _flat(old.get("config", {})), _flat(new.get("config", {}))
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"JOB_{k.upper()} {a.get(k)!r} -> {b.get(k)!r}")
    if old.get("data") != new.get("data"):
        out.append("the data's content (sha256 of its files)")
    for key, var in (("base_model", "JOB_BASE_MODEL"), ("adapter", "JOB_ADAPTER")):
        if old.get(key) != new.get(key) and f"JOB_{key.upper()}" not in " ".join(out):
            out.append(f"{var} (another model, revision or files)")
    return out


def _read_json(uri: storage.Uri, tok: str | None, dest: Path) -> dict | None:
    if not storage.exists(uri, tok):
        return None
    path, _ = storage.pull(uri, dest, token=tok)
    return json.loads(Path(path).read_text(encoding="utf-8"))


def restart_wanted(s: JobSettings, remote: storage.Uri, workdir: Path) -> bool:
    """JOB_RESTART=true starts over once per JOB_RESTART_KEY: a pod retried with the same environment (a Kubernetes Job
    whose spec says JOB_RESTART=true; the manifests set the key to the Job's uid) finds the marker the first attempt
    wrote after its wipe and continues that attempt's run instead of discarding its checkpoints again."""
    if not s.restart:
        return False
    if s.restart_key is None:
        return True
    marker = _read_json(remote.join(RESTARTED), token(s), workdir / "restarted")
    if marker and marker.get("key") == s.restart_key:
        log.info("JOB_RESTART=true already done for JOB_RESTART_KEY=%s at %s: continuing that run", s.restart_key,
                 marker.get("restarted_at"))
        return False
    return True


def run_state(s: JobSettings, remote: storage.Uri, ident: dict, workdir: Path, *, dry: bool, restart: bool) -> str:
    """new / resume / succeeded for this run id, or ConfigError when it was used for something else."""
    tok = token(s)
    if restart:
        if not dry:
            log.warning("JOB_RESTART=true: discarding everything stored for run %s under %s", s.run_id, remote)
            storage.delete(remote, tok)
            if s.restart_key is not None:  # after the wipe, before anything of the new run: see restart_wanted
                path = workdir / RESTARTED
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": s.restart_key, "restarted_at": datetime.now(timezone.utc).isoformat()})
                                + "\n", encoding="utf-8")
                storage.push(path, remote.join(RESTARTED), tok)
        return "new"
    old = _read_json(remote.join(IDENTITY), tok, workdir / "identity")
    succeeded = storage.exists(remote.join("_SUCCESS"), tok)
    if old is not None and old.get("sha256") != ident["sha256"]:
        what = differences(old, ident) or ["the recorded identity"]
        raise ConfigError(f"JOB_RUN_ID={s.run_id}: this run id was used for another run ({remote}): "
                          + "; ".join(what) + ". Use a new JOB_RUN_ID, or set JOB_RESTART=true to discard that run "
                          "and start over")
    if succeeded:
        return "succeeded"
    return "resume" if old is not None else "new"


# ------------------------------------------------------------------------------------------------- 6. plan


def setting_warnings(s: JobSettings, base_dir: Path) -> list[str]:
    """Settings that are valid but would not do what they say: logged, and listed by --check."""
    out = []
    lora_set = sorted(s.lora.model_fields_set)
    if s.adapter and lora_set:
        out.append(f"{', '.join('JOB_LORA__' + n.upper() for n in lora_set)} ignored: JOB_ADAPTER continues an existing "
                   "adapter, with its own rank, alpha, dropout and modules")
    elif "dropout" in lora_set and lora_dropout_ignored(s):
        out.append("JOB_LORA__DROPOUT ignored: DPO turns every dropout off (TRL's disable_dropout; set "
                   "JOB_TRAIN__DISABLE_DROPOUT=false to keep it)")
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(positions, int) and s.train.max_length > positions:
        out.append(f"JOB_TRAIN__MAX_LENGTH={s.train.max_length} is above the base model's max_position_embeddings "
                   f"({positions}): positions past it were never trained and may give poor results")
    return out



def planned_steps(s: JobSettings, fitted: sequences.Fitted, world_size: int = 1) -> dict:
    """Optimizer steps and tokens the trainer will run, computed the way transformers does (packing included)."""
    rows = len(fitted.rows)
    if s.stage == "sft" and s.train.packing:
        from datasets import Dataset
        from trl.data_utils import pack_dataset

        ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in fitted.rows]})
        rows = len(pack_dataset(ds, s.train.max_length, "bfd"))
    batches = math.ceil(math.ceil(rows / world_size) / s.train.per_device_train_batch_size)
    per_epoch = max(1, math.ceil(batches / s.train.gradient_accumulation_steps))
    steps = s.train.max_steps if s.train.max_steps > 0 else math.ceil(s.train.num_train_epochs * per_epoch)
    from job.outputs import micro_batch_shape

    return {"rows_per_epoch": rows, "steps_per_epoch": per_epoch, "steps": steps,
            "epochs": round(steps / per_epoch, 3), "tokens_per_epoch": fitted.report["tokens"],
            "tokens": round(fitted.report["tokens"] * steps / per_epoch),
            "micro_batch": micro_batch_shape(rows, world_size, s.train.per_device_train_batch_size,
                                             s.train.gradient_accumulation_steps)}


def libraries(s: JobSettings) -> None:
    """The training stack, imported once everything that needs none of it is checked (settings, storage, data,
    prompts), so that those mistakes are reported in about a second, not after 10-20 s of imports: torch,
    transformers, PEFT, TRL, bitsandbytes and the stage's own modules, as the run will use them (job/phases.py:
    `checks` ends before them, `libraries` after). Then the settings only TRL's and PEFT's own classes can check."""
    import importlib

    from job import logs, phases
    from job.settings import check_library_settings

    phases.mark("checks")
    logs.route_libraries()  # before they log anything
    for name in ("torch", "job.model", "job.checkpoints", "job.divergence", "job.outputs", f"job.stages.{s.stage}"):
        importlib.import_module(name)
    phases.mark("libraries")
    check_library_settings(s)


def prepare(s: JobSettings, run_id: str, *, dry: bool = False, main: bool = True, world_size: int = 1) -> Plan:
    """All checks, in order. `dry` (--check) reads but never writes or deletes anything but the probes; `main`: this
    is the process that uploads (rank 0), which alone probes the output and acts on JOB_RESTART."""
    from job import evaluate

    remote = storage.parse_uri(s.output).join(run_id)
    workdir = Path(s.workdir) / run_id
    check_writable(s, remote, workdir, output=main, dry=dry)
    inputs = read_data(s, workdir)
    log.info("data: %d training and %d eval records from %d files", len(inputs.train), len(inputs.eval), len(inputs.files))
    prompts = evaluate.load_prompts(s, inputs, workdir, token(s))  # for the before/after answers (job/evaluate.py)
    libraries(s)

    models = check_models(s, workdir)
    base_dir, adapter_dir, model_identity = models.base_dir, models.adapter_dir, models.identity
    from job.model import load_tokenizer

    tokenizer, prompt_format = load_tokenizer(base_dir, adapter_dir, s.prompt_format, eos_token=s.train.eos_token)
    stops = sequences.stop_ids(tokenizer, base_dir)
    policy = dict(max_length=s.train.max_length, policy=s.train.over_length, stops=stops, max_share=s.max_over_length_share)
    train = sequences.fit(inputs.train, s.stage, tokenizer, role="train", **policy)
    evald = sequences.fit(inputs.eval, s.stage, tokenizer, role="eval", **policy) if inputs.eval else None

    warnings = setting_warnings(s, base_dir)
    for warning in warnings:
        log.warning("%s", warning, extra={"fields": {"event": "setting_warning"}})
    ident = identity(s, inputs, model_identity)
    restart = restart_wanted(s, remote, workdir)
    state = run_state(s, remote, ident, workdir, dry=dry or not main, restart=restart)
    plan_steps = planned_steps(s, train, world_size)
    # What `auto` is expected to spend GPU memory on (job/memplan.py); a model that can't fit is refused here, before
    # the weights are downloaded. Made again, measured, once the model is loaded.
    from job import memplan
    from job.model import device_for_rank

    memory = memplan.preview(s, models.meta, train.rows, device_for_rank(), world_size=world_size,
                             padding_free=bool(models.fast and models.fast.padding_free))
    report = {
        "run_id": run_id,
        "output": str(remote),
        "run": {"new": "a new run", "resume": "continues this run id (same stage, config, data and model)",
                "succeeded": "already succeeded: a run would do nothing"}[state]
               + (" (JOB_RESTART=true: what is stored for it would be discarded first)" if restart else
                  f" (JOB_RESTART=true already done for JOB_RESTART_KEY={s.restart_key})" if s.restart else ""),
        "stage": s.stage,
        "files": inputs.files,
        "prompt_format": prompt_format,
        "eos": sorted(tokenizer.convert_ids_to_tokens(sorted(stops))),
        "example": sequences.rendered_example(tokenizer, train.rows[0], s.stage),
        "train": train.report,
        "eval": evald.report if evald else None,
        "plan": plan_steps,
        "eval_prompts": len(prompts),
        # Decided again with the memory plan once the model is loaded (metrics.json has the final table).
        "fast_paths": models.fast.report(),
        "memory_plan": memory,
        "inputs": {**inputs.identity, **model_identity},
        "warnings": warnings,
    }
    log.info("plan: %d optimizer steps over %d %s (%s epochs), about %d tokens", plan_steps["steps"],
             plan_steps["rows_per_epoch"], "packed rows" if s.stage == "sft" and s.train.packing else "examples",
             plan_steps["epochs"], plan_steps["tokens"], extra={"fields": {"event": "plan", **plan_steps}})
    return Plan(run_id=run_id, remote=remote, workdir=workdir, inputs=inputs, models=models, base_dir=base_dir,
                adapter_dir=adapter_dir, model_identity=model_identity, tokenizer=tokenizer, prompt_format=prompt_format,
                stops=stops, prompts=prompts, train=train, eval=evald, identity=ident, state=state, report=report)


def record_identity(plan: Plan, tok: str | None) -> None:
    """Store what this run is, before training starts (rank 0): a later start with this run id compares against it."""
    path = plan.workdir / IDENTITY
    path.write_text(json.dumps(plan.identity, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    storage.push(path, plan.remote.join(IDENTITY), tok)

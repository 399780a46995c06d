"""JOB_STAGE=merge: an adapter merged into its base model, saved as a plain transformers model that serving engines
(vLLM, TGI, llama.cpp's converters) load as is.

    JOB_STAGE=merge JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b JOB_ADAPTER=s3://bucket/runs/dpo-1/adapter/ \\
    JOB_OUTPUT=s3://bucket/runs qlora-job
    # -> s3://bucket/runs/{run_id}/merged/   safetensors shards, config.json, generation_config.json, the tokenizer
    #                                         with the prompt format as its chat template, prompt_format.json, README.md
    #    s3://bucket/runs/{run_id}/run.json, then _SUCCESS

The base is loaded unquantized, in JOB_QUANT__COMPUTE_DTYPE (bfloat16 unless set), on the CPU: adding the LoRA
product to 4-bit weights would need requantizing the sum, which rounds most of the adapter's small updates away. The
merged model therefore equals the 16-bit base plus the adapter; it differs from what training computed (the 4-bit
base plus the adapter) by the base's quantization error, as every QLoRA merge does. It needs no GPU, and memory
for one copy of the model in that dtype plus the page cache of the files it reads: measured on the llm-jp-3-1.8b
shape in bfloat16, 3.3 GiB of anonymous memory (1.9 bytes per parameter) and 6.8 GiB resident with the mapped
safetensors files, in 172 s on two busy CPU cores (bench/merge_memory.py); for 13B that suggests ~25 GB and ~50 GB.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from job import storage
from job.errors import ModelError
from job.settings import JobSettings

log = logging.getLogger("job")

#: Serving engines and the Hub handle shards of this size well; transformers' default (50GB) makes one 26 GB file.
MAX_SHARD_SIZE = "5GB"

MERGED_CARD = """---
{metadata}tags: [qlora-job, merged]
---
# {run_id} (merged)

The LoRA adapter `{adapter}` merged into `{base}` ({dtype}). A plain transformers model: load it with
`AutoModelForCausalLM.from_pretrained`, or serve it as is (`vllm serve MODEL_DIR`). Its tokenizer's chat template is
the prompt format the adapter was trained with (`{prompt_format}`). {where_text}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{where}"
tok = AutoTokenizer.from_pretrained(model_id{hub_args})
model = AutoModelForCausalLM.from_pretrained(model_id{hub_args}, dtype="auto", device_map="auto")
inputs = tok.apply_chat_template([{{"role": "user", "content": "質問"}}], add_generation_prompt=True,
                                 return_dict=True, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=64)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def check(s: JobSettings) -> dict:
    """--check: the adapter and the base model's configuration and tokenizer (no base weights) are downloaded and
    the adapter's target modules looked up in the base's configuration."""
    from job import preflight
    from job.model import load_tokenizer

    models = preflight.check_models(s, Path(s.workdir) / "check")
    _, prompt_format = load_tokenizer(models.base_dir, models.adapter_dir, s.prompt_format)
    adapter, identity = _adapter_config(models.adapter_dir), models.identity
    return {"stage": "merge", "prompt_format": prompt_format, "dtype": s.quant.compute_dtype,
            "adapter": {k: adapter.get(k) for k in ("base_model_name_or_path", "r", "lora_alpha", "target_modules")},
            "inputs": identity}


def run(s: JobSettings) -> str:
    """Merge JOB_ADAPTER into JOB_BASE_MODEL; returns the URI of the run's outputs. One process does the work: under
    torchrun (the image starts it in a pod with several GPUs) the others return at once. A stop signal ends it at
    once (exit 143): there is no partial work worth saving."""
    import torch
    from transformers import AutoModelForCausalLM

    from job import outputs
    from job.model import load_adapter, load_tokenizer, model_errors
    from job import preflight
    from job.pipeline import _distributed_state

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    run_id = s.resolved_run_id()
    token = preflight.token(s)
    remote = storage.parse_uri(s.output).join(run_id)
    if not _distributed_state().is_main_process:
        return str(remote)
    if storage.exists(remote.join("_SUCCESS"), token):
        log.info("run %s already succeeded at %s; nothing to do", run_id, remote)
        return str(remote)
    storage.prepare_output(storage.parse_uri(s.output), token, private=s.hub_private)
    workdir = Path(s.workdir) / run_id
    out = workdir / "out"
    if out.exists():
        shutil.rmtree(out)  # leftovers of an earlier attempt are never published
    out.mkdir(parents=True)
    log.info("run %s: merge of %s into %s -> %s", run_id, s.adapter, s.base_model, remote,
             extra={"fields": {"event": "start", "run_id": run_id, "stage": "merge", "output": str(remote)}})

    # The adapter and the base's small files first: an adapter that does not fit fails before the weights come.
    models = preflight.check_models(s, workdir)
    base_dir, adapter_dir, identity = preflight.pull_weights(s, models), models.adapter_dir, models.identity
    _warn_if_other_base(s, _adapter_config(adapter_dir))
    tokenizer, prompt_format = load_tokenizer(base_dir, adapter_dir, s.prompt_format)
    dtype = getattr(torch, s.quant.compute_dtype)
    if not any(base_dir.glob("*.safetensors")):
        raise ModelError(f"JOB_BASE_MODEL: {s.base_model}: no *.safetensors weights (pickled weights are not loaded)")
    with model_errors(s, "can't load the model"):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True, device_map={"": "cpu"},
                                                    trust_remote_code=s.trust_remote_code)
    model = load_adapter(base, adapter_dir)
    try:
        with torch.no_grad():
            # safe_merge: a broken adapter (NaN or inf weights) fails here instead of poisoning the served model.
            merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise ModelError(f"JOB_ADAPTER: {s.adapter}: can't be merged: {exc}") from None

    dest = out / "merged"
    gen = merged.generation_config
    # Generation stops where the training examples ended: at the tokenizer's EOS, which the prompt format appends.
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if tokenizer.eos_token_id not in eos:
        gen.eos_token_id = eos + [tokenizer.eos_token_id] if eos else tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True  # for serving; a base saved by a training run may have it off
    merged.save_pretrained(dest, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(dest)
    outputs.write_prompt_format(dest, tokenizer, prompt_format)
    _, repo_id, _ = outputs.base_model_ref(s.base_model)
    where, hub_args, where_text = outputs.location_ref(s.output, run_id, "merged")
    (dest / "README.md").write_text(MERGED_CARD.format(
        metadata=f"base_model: {repo_id}\nbase_model_relation: merge\n" if repo_id else "",
        run_id=run_id, adapter=s.adapter, base=s.base_model, dtype=s.quant.compute_dtype, prompt_format=prompt_format,
        where=where, hub_args=hub_args, where_text=where_text,
    ), encoding="utf-8")
    outputs.write_json(out / "run.json", {
        "run_id": run_id,
        "status": "succeeded",
        "stage": "merge",
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_time_s": round(time.monotonic() - t0, 3),
        "prompt_format": prompt_format,
        "dtype": s.quant.compute_dtype,
        "config": s.masked(),
        "inputs": identity,
        "versions": outputs.versions(),
    })
    outputs.publish(out, remote, token)
    outputs.clean_workdir(s, workdir)  # the merged model is uploaded (JOB_KEEP_WORKDIR=true keeps it)
    log.info("done: %s", remote, extra={"fields": {"event": "done", "output": str(remote)}})
    return str(remote)


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise ModelError(f"JOB_ADAPTER: {adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _warn_if_other_base(s: JobSettings, adapter: dict) -> None:
    """An adapter records the base it was trained on; a different Hub id is worth a warning (a mirror or a re-upload
    may be the same model), while a shape mismatch fails when the adapter is loaded."""
    from job import outputs

    recorded = adapter.get("base_model_name_or_path")
    _, repo_id, _ = outputs.base_model_ref(s.base_model)
    if recorded and repo_id and "/" in recorded and not recorded.startswith(("/", "s3://", ".")) and recorded != repo_id:
        log.warning("JOB_ADAPTER was trained on %s, JOB_BASE_MODEL is %s", recorded, repo_id)

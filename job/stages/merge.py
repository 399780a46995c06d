"""JOB_STAGE=merge: an adapter merged into its base model, saved as a plain transformers model that serving engines
(vLLM, TGI, llama.cpp's converters) load as is.

    JOB_STAGE=merge JOB_BASE_MODEL=hf://llm-jp/llm-jp-3-13b JOB_ADAPTER=s3://bucket/runs/dpo-1/adapter/ \\
    JOB_OUTPUT=s3://bucket/runs qlora-job
    # -> s3://bucket/runs/{run_id}/merged/   safetensors shards, config.json, generation_config.json, the tokenizer
    #                                         with the prompt format as its chat template, prompt_format.json, README.md
    #    s3://bucket/runs/{run_id}/metrics.json  which base, and (with JOB_EVAL_DATA or JOB_EVAL_PROMPTS) how far the
    #                                         merged model is from the trained one
    #    s3://bucket/runs/{run_id}/run.json, then _SUCCESS

The adapter was trained on JOB_BASE_MODEL quantized (NF4 by default): every metric of the run describes that model.
JOB_MERGE__BASE picks the 16-bit base the adapter is added to. `dequantized` (the default): the base quantized with
the JOB_QUANT__* settings and dequantized to JOB_QUANT__COMPUTE_DTYPE, the very weights training computed with, so
the merged model computes what was trained and measured. `original`: the checkpoint's own weights, which differ from
the trained model by the base's quantization error. Adding the LoRA product to 4-bit weights instead would need
requantizing the sum, which rounds most of the adapter's small updates away.

With JOB_EVAL_PROMPTS or JOB_EVAL_DATA set, the merge measures itself against the trained model (the 4-bit base plus
the adapter) and writes metrics.json: the held-out loss of both, the mean per-token KL divergence from the trained
model to the merged one, and the share of greedy answers that are the same (`compare`).

It needs no GPU (the trained model for the comparison goes on one when there is one), and memory for one copy of the
model in the compute dtype plus the page cache of the files it reads, plus the 4-bit copy when measuring: measured on
the llm-jp-3-1.8b shape in bfloat16 (original base, no measuring), 3.3 GiB of anonymous memory (1.9 bytes per
parameter) and 6.8 GiB resident with the mapped safetensors files, in 172 s on two busy CPU cores
(bench/merge_memory.py); for 13B that suggests ~25 GB and ~50 GB.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from job import distributed, storage
from job.errors import DataError, ModelError
from job.settings import JobSettings

log = logging.getLogger("job")

#: Serving engines and the Hub handle shards of this size well; transformers' default (50GB) makes one 26 GB file.
MAX_SHARD_SIZE = "5GB"
#: Records of JOB_EVAL_PROMPTS / JOB_EVAL_DATA the comparison reads (loss and KL); the first evaluate.DEFAULT_PROMPTS
#: of them are also answered greedily by both models. Enough to tell the bases apart, few enough for a CPU.
COMPARE_ROWS = 32
#: Prompt + answer tokens per generate() batch in the comparison.
BATCH_TOKENS = 8192

MERGED_CARD = """---
{metadata}---
# {run_id} (merged)

The LoRA adapter `{adapter}` merged into `{base}` ({base_text}, {dtype}). A plain transformers model: load it with
`AutoModelForCausalLM.from_pretrained`, or serve it as is (`vllm serve MODEL_DIR`). Its tokenizer's chat template is
the prompt format the adapter was trained with (`{prompt_format}`). {where_text}
{comparison}
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
    """--check: the adapter and the base model's configuration and tokenizer (no base weights) are downloaded, the
    adapter's target modules looked up in the base's configuration, and the comparison's prompts read."""
    from job import preflight
    from job.model import load_tokenizer

    workdir = Path(s.workdir) / "check"
    models = preflight.check_models(s, workdir)
    _, prompt_format = load_tokenizer(models.base_dir, models.adapter_dir, s.prompt_format)
    adapter, identity = _adapter_config(models.adapter_dir), models.identity
    variable, prompts = comparison_prompts(s, workdir, preflight.token(s), identity)
    return {"stage": "merge", "prompt_format": prompt_format, "dtype": s.quant.compute_dtype, "base": s.merge.base,
            "adapter": {k: adapter.get(k) for k in ("base_model_name_or_path", "r", "lora_alpha", "target_modules")},
            "compared_on": {"variable": variable, "prompts": len(prompts)} if prompts else None,
            "inputs": identity}


def run(s: JobSettings) -> str:
    """Merge JOB_ADAPTER into JOB_BASE_MODEL; returns the URI of the run's outputs. One process does the work: under
    torchrun (the image starts it in a pod with several GPUs) the others return at once. A stop signal ends it at
    once (exit 143): there is no partial work worth saving."""
    import torch

    from job import outputs, preflight
    from job.model import load_adapter, load_base_model, load_tokenizer

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    run_id = s.resolved_run_id()
    token = preflight.token(s)
    remote = storage.parse_uri(s.output).join(run_id)
    if not distributed.state().is_main_process:
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
    log.info("run %s: merge of %s into %s (%s) -> %s", run_id, s.adapter, s.base_model, s.merge.base, remote,
             extra={"fields": {"event": "start", "run_id": run_id, "stage": "merge", "output": str(remote)}})

    # The adapter, the base's small files and the comparison's prompts first: an adapter that does not fit or a bad
    # prompts file fails before the weights come.
    models = preflight.check_models(s, workdir)
    identity = models.identity
    variable, prompts = comparison_prompts(s, workdir, token, identity)
    base_dir, adapter_dir = preflight.pull_weights(s, models), models.adapter_dir
    _warn_if_other_base(s, _adapter_config(adapter_dir))
    tokenizer, prompt_format = load_tokenizer(base_dir, adapter_dir, s.prompt_format)
    if not any(base_dir.glob("*.safetensors")):
        raise ModelError(f"JOB_BASE_MODEL: {s.base_model}: no *.safetensors weights (pickled weights are not loaded)")
    # The model the adapter was trained as, the reference of the comparison: loaded as training loads it.
    trained = load_adapter(load_base_model(base_dir, s), adapter_dir) if prompts else None
    model = load_adapter(_base_16bit(s, base_dir), adapter_dir)
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

    metrics = {"stage": "merge", "base": s.merge.base, "dtype": s.quant.compute_dtype, "quant": _quant_text(s)}
    if trained is not None:
        log.info("comparing the merged model with the trained one on %d prompts of %s", len(prompts), variable)
        metrics.update(compared_on=variable, compared_data=s.eval_prompts if variable == "JOB_EVAL_PROMPTS" else s.eval_data,
                       **compare(trained, merged, tokenizer, prompts, s))
    else:
        log.info("the merged model is not compared with the trained one: set JOB_EVAL_DATA or JOB_EVAL_PROMPTS")
    outputs.write_json(out / "metrics.json", metrics)
    _, repo_id, _ = outputs.base_model_ref(s.base_model)
    where, hub_args, where_text = outputs.location_ref(s.output, run_id, "merged")
    (dest / "README.md").write_text(MERGED_CARD.format(
        metadata=outputs.card_metadata(base_model=repo_id, relation="merge", tags=["qlora-job", "merged"],
                                       model_name=run_id, results=_card_results(metrics),
                                       results_data=metrics.get("compared_data")),
        run_id=run_id, adapter=s.adapter, base=s.base_model, dtype=s.quant.compute_dtype, prompt_format=prompt_format,
        base_text=_base_text(s), where=where, hub_args=hub_args, where_text=where_text,
        comparison=_card_comparison(metrics),
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
    log.info("done: %s", remote, extra={"fields": {"event": "done", "output": str(remote), "metrics": metrics}})
    print(summary(out, str(remote), s), flush=True)
    outputs.clean_workdir(s, workdir)  # the merged model is uploaded (JOB_KEEP_WORKDIR=true keeps it)
    return str(remote)


def _quant_text(s: JobSettings) -> str:
    q = s.quant
    return "none" if q.load_in == "none" else "8bit" if q.load_in == "8bit" else \
        f"{q.type}{' double-quantized' if q.double_quant else ''}"


def _base_text(s: JobSettings) -> str:
    if s.merge.base == "original" or s.quant.load_in == "none":
        return "its own weights"
    return f"dequantized from {_quant_text(s)}, the weights the adapter was trained with"


def _base_16bit(s: JobSettings, base_dir: Path):
    """JOB_BASE_MODEL in the compute dtype on the CPU: its own weights, or (JOB_MERGE__BASE=dequantized) its weights
    quantized as training quantized them and dequantized again."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.model import keep_4bit_layout, model_errors, quantization_config

    quant = quantization_config(s.quant) if s.merge.base == "dequantized" else None
    with model_errors(s, "can't load the model"):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, s.quant.compute_dtype),
                                                    quantization_config=quant, use_safetensors=True,
                                                    device_map={"": "cpu"}, trust_remote_code=s.trust_remote_code)
    if quant is not None:
        keep_4bit_layout(base)  # nothing runs it in 4 bits, but a repacked weight would not dequantize
        base.dequantize()  # transformers: every quantized layer back to a plain nn.Linear in the compute dtype
    return base


# --------------------------------------------------------------------------------------------------- comparison


def comparison_prompts(s: JobSettings, workdir: Path, token: str | None, identity: dict) -> tuple[str | None, list]:
    """The records the merged model is compared on: JOB_EVAL_PROMPTS, else JOB_EVAL_DATA (a prompt column or any SFT
    or DPO record format; a reference answer is the completion, or DPO's chosen one); (None, []) when neither is set
    or JOB_EVAL_PROMPTS=none. Adds the file's identity to `identity`. Raises DataError naming the variable, the file
    and the row."""
    from job import evaluate

    if not evaluate.enabled(s):
        return None, []
    variable, uri = ("JOB_EVAL_PROMPTS", s.eval_prompts) if s.eval_prompts else ("JOB_EVAL_DATA", s.eval_data)
    if not uri:
        return None, []
    try:
        path, ident = storage.pull(storage.parse_uri(uri), workdir / "data" / "compare", token=token)
        prompts = evaluate._read_prompts(path, uri, s.columns)
    except DataError as exc:
        raise DataError(f"{variable}: {exc}") from None
    identity[variable.removeprefix("JOB_").lower()] = ident
    return variable, prompts[:COMPARE_ROWS]


def compare(trained, merged, tokenizer, prompts: list, s: JobSettings) -> dict:
    """How far the merged model is from the trained one (the 4-bit base plus the adapter), as metrics.json keys.

    eval_loss_trained, eval_loss_merged: mean loss per reference-answer token (the records that have a reference);
    kl_per_token: mean KL(trained || merged) of the next-token distributions over the answer tokens (the reference,
    else the trained model's greedy answer); greedy_agreement: share of the first prompts whose greedy answers
    (JOB_EVAL_MAX_NEW_TOKENS at most) are the same text."""
    import torch

    from job import evaluate

    merged_device = _comparison_device(merged)
    merged.to(merged_device)
    trained.eval()
    merged.eval()
    asked = prompts[:evaluate.DEFAULT_PROMPTS]
    answers = {name: evaluate.generate(m, tokenizer, asked, max_new_tokens=s.eval_max_new_tokens, batch_tokens=BATCH_TOKENS)
               for name, m in (("trained", trained), ("merged", merged))}
    both = [(a["text"], b["text"]) for a, b in zip(answers["trained"], answers["merged"])
            if a["text"] is not None and b["text"] is not None]
    nll = {"trained": 0.0, "merged": 0.0}
    kl = 0.0
    ref_tokens = kl_tokens = 0
    for i, p in enumerate(prompts):
        answer = p.reference if p.reference is not None else (answers["trained"][i]["text"] if i < len(asked) else None)
        if not answer:
            continue
        prompt_ids = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tokenizer.apply_chat_template(p.messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                            return_dict=False)[:s.train.max_length]
        start = len(prompt_ids)
        if ids[:start] != prompt_ids or len(ids) <= start:
            continue  # a template that renders the prompt differently before an answer: no answer tokens to score
        x = torch.tensor([ids])
        with torch.no_grad():
            # Positions start-1 .. end-2 predict the answer tokens; float32 on the CPU for the sums.
            lp = {name: m(input_ids=x.to(dev)).logits[0, start - 1:-1].float().log_softmax(-1).cpu()
                  for name, m, dev in (("trained", trained, _device(trained)), ("merged", merged, merged_device))}
        target = x[0, start:]
        kl += float((lp["trained"].exp() * (lp["trained"] - lp["merged"])).sum())
        kl_tokens += len(target)
        if p.reference is not None:
            for name in nll:
                nll[name] -= float(lp[name].gather(1, target[:, None]).sum())
            ref_tokens += len(target)
    return {
        "eval_loss_trained": round(nll["trained"] / ref_tokens, 6) if ref_tokens else None,
        "eval_loss_merged": round(nll["merged"] / ref_tokens, 6) if ref_tokens else None,
        "kl_per_token": round(kl / kl_tokens, 9) if kl_tokens else None,
        "compared_tokens": kl_tokens,
        "greedy_agreement": round(sum(a == b for a, b in both) / len(both), 4) if both else None,
        "greedy_prompts": len(both),
    }


def _device(model):
    return next(model.parameters()).device


def _comparison_device(merged):
    """The GPU, when the merged model fits in half its free memory (the trained model is there already); else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    size = sum(p.numel() * p.element_size() for p in merged.parameters())
    free, _ = torch.cuda.mem_get_info()
    return torch.device("cuda", torch.cuda.current_device()) if size < free / 2 else torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ report


def _card_results(m: dict) -> list[tuple[str, str, float]]:
    """(metric type, name, value) for the model card's eval results."""
    keys = (("loss", "held-out loss (merged)", "eval_loss_merged"),
            ("loss", "held-out loss (trained: 4-bit base + adapter)", "eval_loss_trained"),
            ("kl_divergence", "mean per-token KL from the trained model", "kl_per_token"),
            ("agreement", "greedy answers equal to the trained model's", "greedy_agreement"))
    return [(t, name, m[k]) for t, name, k in keys if m.get(k) is not None]


def _card_comparison(m: dict) -> str:
    if m.get("kl_per_token") is None:
        return ""
    text = (f"\nCompared with the trained model (the {m['quant']} base plus the adapter) on {m['compared_tokens']} answer "
            f"tokens of `{m['compared_on']}`: mean per-token KL {m['kl_per_token']:.3g}")
    if m.get("eval_loss_merged") is not None:
        text += f", held-out loss {m['eval_loss_merged']:.4g} merged vs {m['eval_loss_trained']:.4g} trained"
    if m.get("greedy_agreement") is not None:
        text += f", {m['greedy_agreement']:.0%} of {m['greedy_prompts']} greedy answers the same"
    return text + " (metrics.json beside this folder).\n"


def summary(out: Path, remote: str, s: JobSettings) -> str:
    """The closing text of a merge, from its metrics.json, like job/evaluate.py's for SFT and DPO."""
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    lines = ["", f"qlora-job merge finished: {remote}",
             f"  {s.adapter} merged into {s.base_model} ({_base_text(s)}; JOB_MERGE__BASE={s.merge.base}), {m['dtype']}"]
    if m.get("kl_per_token") is not None:
        text = f"  vs the trained model on {m['compared_on']}: KL {m['kl_per_token']:.3g} per token"
        if m.get("eval_loss_merged") is not None:
            text += f", eval loss {m['eval_loss_trained']:.4g} trained -> {m['eval_loss_merged']:.4g} merged"
        if m.get("greedy_agreement") is not None:
            text += f", greedy answers the same for {m['greedy_agreement']:.0%} of {m['greedy_prompts']} prompts"
        lines.append(text)
    else:
        lines.append("  not compared with the trained model (set JOB_EVAL_DATA or JOB_EVAL_PROMPTS to measure it)")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    lines.append(f"  outputs: {', '.join(names)}, _SUCCESS")
    return "\n".join(lines) + "\n"


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

"""What a run taught, shown next to its metrics: the same prompts answered by the starting model and by the trained
adapter, the held-out metrics, a loss plot and a closing summary.

Written next to metrics.json under {JOB_OUTPUT}/{run_id}/:

    generations.jsonl   one line per prompt: prompt, reference answer (when the data has one), `before` (the starting
                        model: the base, or base + JOB_ADAPTER), `after` (this run's adapter), whether each stopped at
                        EOS, token counts, exact match against the reference
    generations.md      the same, side by side, readable on GitHub or as plain text in a bucket browser
    loss.png            training loss per step with the eval points; for DPO also reward accuracy and margin
    tensorboard/        TensorBoard event files, with JOB_TRAIN__REPORT_TO=tensorboard

Prompts: JOB_EVAL_PROMPTS (a file or URI in the same forms as JOB_DATA: JSONL/JSON/CSV/Parquet with a prompt column
or any SFT record format, or a .txt file with one prompt per line), by default the first 8 records of the eval data
(else of the training data); `none` turns generations off. Answers are greedy, use the prompt format saved with the
adapter (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, as a user would), stop at EOS and
are capped at JOB_EVAL_MAX_NEW_TOKENS new tokens.

    >>> prompts = load_prompts(s, inputs, workdir, token)            # with the data: a bad file fails before the model
    >>> before = generate_before(trainer, tokenizer, prompts, s)     # before trainer.train()
    >>> after = generate_after(trainer, tokenizer, prompts, s)       # after it
    >>> metrics.update(eval_metrics(s.stage, trainer.evaluate()) | write_report(out, s, trainer, prompts, before, after))
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from job import data, storage
from job.errors import DataError

log = logging.getLogger("job.evaluate")

#: Prompts taken from the eval (or training) data when JOB_EVAL_PROMPTS is not set.
DEFAULT_PROMPTS = 8
#: Wall-clock limit for each side's generations (before, after). On several GPUs the other processes wait at their
#: first collective while rank 0 generates, so this stays far below the 30-minute distributed timeout.
TIME_BUDGET_S = 300.0
#: At most this many prompts per generate() call: the token budget alone would batch hundreds of very short prompts,
#: and 64 already keep a GPU busy while one slow answer holds up fewer others.
MAX_BATCH = 64
#: Share of the GPU memory available before or after training that generation may use (job/evaluate.py's
#: _generation_memory): a dequantized copy of a 4-bit base and the KV cache.
GPU_SHARE = 0.5
#: Columns that hold a reference answer in a prompts-only file.
REFERENCE_COLUMNS = ("completion", "output", "chosen", "answer", "reference")


@dataclass
class Prompt:
    messages: list[dict]  # the prompt as chat messages, as the trainer saw it
    reference: str | None = None  # the answer in the data, when there is one

    @property
    def text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1]["content"])


def enabled(s) -> bool:
    return (s.eval_prompts or "").strip().lower() != "none"


# ------------------------------------------------------------------------------------------------------ prompts


def load_prompts(s, inputs, workdir: Path, token: str | None) -> list[Prompt]:
    """The prompts to answer before and after training. Reads JOB_EVAL_PROMPTS (adding its identity to
    `inputs.identity["eval_prompts"]` for run.json), or takes the first records of the eval/training data.
    Raises DataError naming JOB_EVAL_PROMPTS, the file and the row."""
    if not enabled(s):
        return []
    if not s.eval_prompts:
        records = (inputs.eval or inputs.train)[:DEFAULT_PROMPTS]
        return [Prompt(r["prompt"], _answer(r)) for r in records]
    try:
        path, ident = storage.pull(storage.parse_uri(s.eval_prompts), workdir / "data" / "eval_prompts", token=token)
        prompts = _read_prompts(path, s.eval_prompts, s.columns)
    except DataError as exc:
        raise DataError(f"JOB_EVAL_PROMPTS: {exc}") from None
    ident["sha256"] = {name: storage.sha256(p) for p, name in _prompt_files(path, s.eval_prompts)}
    inputs.identity["eval_prompts"] = ident
    return prompts


def _answer(record: dict) -> str | None:
    answer = record.get("completion") or record.get("chosen")
    return answer[-1]["content"] if answer else None


def _prompt_files(path: Path, display: str) -> list[tuple[Path, str]]:
    if path.is_file() and path.suffix.lower() == ".txt":
        return [(path, display)]
    return data.data_files(path, display)


def _read_prompts(path: Path, display: str, columns) -> list[Prompt]:
    out: list[Prompt] = []
    for file, name in _prompt_files(path, display):
        if file.suffix.lower() == ".txt":
            try:
                lines = file.read_bytes().decode("utf-8-sig").splitlines()
            except UnicodeDecodeError as exc:
                raise DataError(f"{name}: not valid UTF-8 (byte {exc.start})") from None
            out += [Prompt([{"role": "user", "content": line}]) for line in lines if line.strip()]
            continue
        rows = list(data.read_rows(file, name, "prompts", columns))
        pk = columns.prompt or "prompt"
        if rows and isinstance(rows[0][1], dict) and pk in rows[0][1] and (columns.completion or "completion") not in rows[0][1]:
            out += [_prompt_row(rec, pk, f"{name}: row {row}") for row, rec in rows]  # prompts, maybe with answers
        else:
            # Any SFT record format (an eval set, say): its answers become the references.
            out += [Prompt(r["prompt"], _answer(r)) for r in data.load_records(file, name, "sft", columns)]
    if not out:
        raise DataError(f"{display}: no prompts")
    return out


def _prompt_row(rec, key: str, where: str) -> Prompt:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with a {key!r} field")
    value = rec.get(key)
    if isinstance(value, str) and value.strip():
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m.get("role", "user"), "content": m["content"]} for m in value]
    else:
        raise DataError(f"{where}: field {key!r} must be non-empty text or a list of messages")
    ref = next((rec[c] for c in REFERENCE_COLUMNS if isinstance(rec.get(c), str) and rec[c].strip()), None)
    return Prompt(messages, ref)


# --------------------------------------------------------------------------------------------------- generating


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation-config EOS ids (TRL adds the
    training EOS there when it differs from the tokenizer's)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def _is_main(trainer) -> bool:
    return trainer.is_world_process_zero()


def generate_before(trainer, tokenizer, prompts: list[Prompt], s) -> list[dict] | None:
    """Answers of the starting model, on rank 0; call before trainer.train() (which loads a resume checkpoint).
    Without JOB_ADAPTER the adapter is switched off, so "before" is the base model whatever the LoRA initialisation."""
    if not prompts or not _is_main(trainer):
        return None
    model = trainer.model
    if s.adapter or not hasattr(model, "disable_adapter"):
        return _generate_logged("before", model, tokenizer, prompts, s)
    with model.disable_adapter():
        return _generate_logged("before", model, tokenizer, prompts, s)


def generate_after(trainer, tokenizer, prompts: list[Prompt], s) -> list[dict] | None:
    """Answers of the trained adapter (the active one: DPO's frozen "ref" copy is not used), on rank 0."""
    if not prompts or not _is_main(trainer):
        return None
    return _generate_logged("after", trainer.model, tokenizer, prompts, s)


def _generate_logged(side: str, model, tokenizer, prompts, s) -> list[dict]:
    t0 = time.monotonic()
    with _generation_memory(model, s) as batch_tokens:
        out = generate(model, tokenizer, prompts, max_new_tokens=s.eval_max_new_tokens, batch_tokens=batch_tokens)
    seconds = time.monotonic() - t0
    done = [g for g in out if g["text"] is not None]
    log.info("generations (%s): %d of %d prompts answered in %.1fs, %d stopped at EOS", side, len(done), len(out),
             seconds, sum(g["stopped_at_eos"] for g in done),
             extra={"fields": {"event": "generations", "side": side, "prompts": len(out), "answered": len(done),
                               "seconds": round(seconds, 2)}})
    return out


@contextlib.contextmanager
def _generation_memory(model, s):
    """Yields the token budget of a generation batch. On a GPU, generation may use up to GPU_SHARE of the memory
    available now (training's activations are not alive before or after training): for a 4-bit base without a kept
    copy (job/model.py's keep_dequantized), a copy dequantized for the duration, so that each new token is not
    paid for by dequantizing every layer again (bitsandbytes does that for any batch of more than one prompt; the
    products are the same), then batches as large as the KV cache allows, so that the prompts take fewer passes.
    The copy is released afterwards: training's memory is what it was. Elsewhere, or when the config does not say:
    the eval batch's token count (JOB_TRAIN__PER_DEVICE_EVAL_BATCH_SIZE x JOB_TRAIN__MAX_LENGTH).
    JOB_QUANT__KEEP_DEQUANTIZED=false: no copy here either."""
    import torch

    from job.model import dequantized_bytes, drop_dequantized, four_bit_layers, keep_dequantized, kv_cache_bytes_per_token

    budget = s.train.per_device_eval_batch_size * s.train.max_length
    device = next(model.parameters()).device
    per_token = kv_cache_bytes_per_token(getattr(model, "config", None))
    if device.type != "cuda" or per_token is None:
        yield budget
        return
    per_token *= 2  # + the prompt pass's transient activations and the allocator's slack
    free, _ = torch.cuda.mem_get_info(device)
    room = GPU_SHARE * (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    layers = four_bit_layers(model)
    added = 0
    if layers and s.quant.keep_dequantized != "false" and not any("_dequantized" in m._buffers for m in layers) \
            and dequantized_bytes(model) + budget * per_token <= room:
        added = keep_dequantized(model)
    budget = max(budget, int((room - added) // per_token))
    log.info("generation memory: batches of up to %d tokens%s", budget,
             f", a {added / 2**30:.1f} GiB dequantized copy of the 4-bit base for the duration" if added else "")
    try:
        yield budget
    finally:
        if added:
            drop_dequantized(model)
        # The KV cache and decode graphs' memory back to the GPU: the memory plan (job/memplan.py) counted on it.
        torch.cuda.empty_cache()


def generate(model, tokenizer, prompts: list[Prompt], *, max_new_tokens: int, batch_tokens: int,
             time_budget_s: float = TIME_BUDGET_S) -> list[dict]:
    """Greedy answers, one dict per prompt (in order): text (None when the time budget ran out first), stopped_at_eos,
    new_tokens, prompt_tokens.

    Batches hold at most `batch_tokens` prompt + answer tokens, the token count of an eval batch, whose memory the run
    already needs; prompts are sorted by length so each batch pads little."""
    import torch

    from job import decode

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
    results: list[dict] = [{"text": None, "stopped_at_eos": False, "new_tokens": 0, "prompt_tokens": len(e)} for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    deadline = time.monotonic() + time_budget_s
    why_not = decode.unsupported(model)  # job/decode.py's static cache and CUDA graph, or transformers' generate
    if why_not is not None:
        log.info("generations: transformers' generate (the static-cache path does not cover this model: %s)", why_not)
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order) and time.monotonic() < deadline:
            end = start + 1
            while end < len(order) and end - start < MAX_BATCH and \
                    (end - start + 1) * (len(encoded[order[end]]) + max_new_tokens) <= batch_tokens:
                end += 1
            idx = order[start:end]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding_side="left", return_tensors="pt").to(device)
            with torch.no_grad():
                if why_not is None:
                    new = decode.greedy(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                        eos=eos, deadline=deadline)
                else:
                    seqs = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                          eos_token_id=eos, pad_token_id=pad, use_cache=True,
                                          max_time=max(deadline - time.monotonic(), 1.0))
                    new = seqs[:, batch["input_ids"].shape[1]:]
            for i, row in zip(idx, new.tolist()):
                stop = next((k for k, t in enumerate(row) if t in eos), None)
                answer = row if stop is None else row[:stop]
                results[i].update(text=tokenizer.decode(answer, skip_special_tokens=True), stopped_at_eos=stop is not None,
                                  new_tokens=len(answer) + (stop is not None))
            start = end
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------------- report


def eval_metrics(stage: str, evaluated: dict | None) -> dict:
    """metrics.json keys from trainer.evaluate()'s output (None when there is no eval data: nothing is added)."""
    if not evaluated:
        return {}
    names = {"eval_loss": "eval_loss"}
    if stage == "sft":
        names["eval_mean_token_accuracy"] = "eval_mean_token_accuracy"
    else:
        names.update({"eval_rewards/accuracies": "eval_reward_accuracy", "eval_rewards/margins": "eval_reward_margin",
                      "eval_rewards/chosen": "eval_reward_chosen", "eval_rewards/rejected": "eval_reward_rejected",
                      "eval_logps/chosen": "eval_logps_chosen", "eval_logps/rejected": "eval_logps_rejected"})
    return {key: _finite(evaluated.get(src)) for src, key in names.items()}


def _finite(v):
    import math

    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def exact_match(text: str | None, reference: str | None) -> bool | None:
    if reference is None:
        return None
    return text is not None and text.strip() == reference.strip()


def rows(prompts: list[Prompt], before: list[dict] | None, after: list[dict] | None) -> list[dict]:
    """generations.jsonl's lines."""
    out = []
    for i, p in enumerate(prompts):
        row = {"prompt": p.text}
        if len(p.messages) > 1:
            row["messages"] = p.messages
        row["reference"] = p.reference
        for side, gens in (("before", before), ("after", after)):
            g = gens[i] if gens else {"text": None, "stopped_at_eos": False, "new_tokens": 0}
            row[side] = g["text"]
            row[f"{side}_stopped_at_eos"] = g["stopped_at_eos"]
            row[f"{side}_new_tokens"] = g["new_tokens"]
            row[f"{side}_exact_match"] = exact_match(g["text"], p.reference)
        row["prompt_tokens"] = (after or before or [{}])[i].get("prompt_tokens")
        out.append(row)
    return out


def generation_metrics(table: list[dict]) -> dict:
    """Share of answers that equal the reference exactly (stripped) and that stopped at EOS, before and after."""
    if not table:
        return {}
    out = {"generation_prompts": len(table)}
    refs = [r for r in table if r["reference"] is not None]
    for side in ("before", "after"):
        out[f"generation_exact_match_{side}"] = round(sum(bool(r[f"{side}_exact_match"]) for r in refs) / len(refs), 4) if refs else None
        out[f"generation_stopped_at_eos_{side}"] = round(sum(r[f"{side}_stopped_at_eos"] for r in table) / len(table), 4)
    return out


def write_report(out: Path, s, trainer, prompts: list[Prompt], before: list[dict] | None, after: list[dict] | None) -> dict:
    """Write generations.jsonl, generations.md, loss.png (and tensorboard/) into `out`; returns the metrics.json keys
    about the generations."""
    history = [h for h in trainer.state.log_history if "step" in h]
    plot_loss(history, s.stage, out / "loss.png", title=f"{s.stage} of {s.base_model}")
    _copy_tensorboard(trainer, out / "tensorboard")
    if not prompts:
        return {}
    table = rows(prompts, before, after)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for r in table:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "generations.md").write_text(markdown(table, s), encoding="utf-8")
    return generation_metrics(table)


def _md_cell(text: str | None) -> str:
    if text is None:
        return "*(not generated: time budget spent)*"
    if not text.strip():
        return "*(empty)*"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    # A model can emit any byte; control characters would garble a terminal or a bucket browser's text view.
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def markdown(table: list[dict], s) -> str:
    start = f"base + `{s.adapter}`" if s.adapter else "the base model"
    m = generation_metrics(table)
    lines = [f"# Before and after: {s.stage} of `{s.base_model}`", "",
             f"**before**: {start}; **after**: the adapter this run trained. Greedy, at most {s.eval_max_new_tokens} new "
             "tokens; ⏹ = stopped at EOS, ⋯ = cut at the token limit.", ""]
    if m.get("generation_exact_match_after") is not None:
        lines += [f"Exact match with the reference: {m['generation_exact_match_before']:.0%} before, "
                  f"{m['generation_exact_match_after']:.0%} after. Stopped at EOS: {m['generation_stopped_at_eos_before']:.0%} "
                  f"before, {m['generation_stopped_at_eos_after']:.0%} after.", ""]
    for i, r in enumerate(table, 1):
        lines += [f"## {i}", "", *("> " + line for line in r["prompt"].splitlines() or [""]), ""]
        if r["reference"] is not None:
            lines += [f"reference: {_md_cell(r['reference'])}", ""]
        marks = {side: ("⏹" if r[f"{side}_stopped_at_eos"] else "⋯") + f" {r[f'{side}_new_tokens']} tokens"
                 + (" ✓" if r[f"{side}_exact_match"] else "") for side in ("before", "after")}
        lines += [f"| before ({marks['before']}) | after ({marks['after']}) |", "|---|---|",
                  f"| {_md_cell(r['before'])} | {_md_cell(r['after'])} |", ""]
    return "\n".join(lines)


def loss_series(history: list[dict], stage: str) -> dict[str, tuple[list[int], list[float]]]:
    """The plotted series, from the trainer's log history (which survives a resume): name -> (steps, values)."""
    keys = {"train loss": "loss", "eval loss": "eval_loss"}
    if stage == "dpo":
        keys.update({"train reward accuracy": "rewards/accuracies", "eval reward accuracy": "eval_rewards/accuracies",
                     "train reward margin": "rewards/margins", "eval reward margin": "eval_rewards/margins"})
    series = {}
    for name, key in keys.items():
        points = {}
        for h in history:  # the final evaluate() repeats the last step's eval: keep one point per step
            if _finite(h.get(key)) is not None:
                points[h["step"]] = h[key]
        series[name] = (sorted(points), [points[k] for k in sorted(points)])
    return series


def plot_loss(history: list[dict], stage: str, path: Path, title: str = "") -> None:
    loss_figure(history, stage, title).savefig(path, dpi=100)


def loss_figure(history: list[dict], stage: str, title: str = ""):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    series = loss_series(history, stage)
    panels = [("loss", ["train loss", "eval loss"])]
    if stage == "dpo":
        panels += [("reward accuracy", ["train reward accuracy", "eval reward accuracy"]),
                   ("reward margin", ["train reward margin", "eval reward margin"])]
    fig = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
    for ax, (ylabel, names) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in names:
            steps, values = series[name]
            if not steps:
                continue
            if name.startswith("train"):
                ax.plot(steps, values, label=name, linewidth=1.2)
            else:
                ax.plot(steps, values, "o", label=name, markersize=6)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        # Values as they are: with an offset, a loss flat to 1e-6 is drawn as a steep fall labelled "+6.931e-1".
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def _copy_tensorboard(trainer, dest: Path) -> None:
    """Copy transformers' TensorBoard event files next to metrics.json (they are written under the checkpoint directory,
    which is not uploaded). Its writer (one for the whole run: `outputs.OneWriterTensorBoard`) is closed first:
    tensorboardX's flush() doesn't wait for the events still queued for its writer thread."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir:
            if cb.tb_writer is not None:
                cb.tb_writer.close()
                cb.tb_writer = None
            if Path(cb.logging_dir).is_dir():
                shutil.copytree(cb.logging_dir, dest, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------------ summary


def _short(text: str | None, n: int = 160) -> str:
    if text is None:
        return "(not generated)"
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= n else flat[: n - 1] + "…")


def summary(out: Path, remote: str, history: list[dict]) -> str:
    """The closing text of a run, from the files it is about to have uploaded (metrics.json, generations.jsonl)."""
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    losses = [h["loss"] for h in history if _finite(h.get("loss")) is not None]
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    stage = m.get("stage", "")
    line = f"  {m.get('steps')} steps"
    if first is not None:
        line += f", train loss {first:.4g} -> {last:.4g}"
    if m.get("eval_loss") is not None:
        line += f", eval loss {m['eval_loss']:.4g}"
    if stage == "sft" and m.get("eval_mean_token_accuracy") is not None:
        line += f", eval token accuracy {m['eval_mean_token_accuracy']:.1%}"
    if stage == "dpo":
        if m.get("eval_reward_accuracy") is not None:
            line += f", eval reward accuracy {m['eval_reward_accuracy']:.1%}"
            if m.get("eval_reward_margin") is not None:
                line += f" (margin {m['eval_reward_margin']:.3g})"
        elif m.get("reward_accuracy") is not None:
            line += f", train reward accuracy {m['reward_accuracy']:.1%} (run mean)"
    if m.get("train_runtime_s") is not None:
        line += f", {m['train_runtime_s']:.0f}s of training"
    lines = ["", f"qlora-job {stage} finished: {remote}", line]
    lines += [f"  WARNING: {w}" for w in m.get("warnings") or []]  # job/divergence.py: a run that did not learn
    if m.get("generation_prompts"):
        em_b, em_a = m.get("generation_exact_match_before"), m.get("generation_exact_match_after")
        text = f"  answers to {m['generation_prompts']} prompts"
        if em_a is not None:
            text += f": exact match {em_b:.0%} before -> {em_a:.0%} after"
        text += f"; stopped at EOS {m['generation_stopped_at_eos_before']:.0%} -> {m['generation_stopped_at_eos_after']:.0%}"
        lines.append(text)
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    lines.append(f"  outputs: {', '.join(names)}, _SUCCESS")
    gens = out / "generations.jsonl"
    if gens.exists():
        r = json.loads(gens.read_text(encoding="utf-8").splitlines()[0])
        lines += [f"  prompt: {_short(r['prompt'])}", f"    before: {_short(r['before'])}", f"    after:  {_short(r['after'])}"]
        if r["reference"] is not None:
            lines.append(f"    reference: {_short(r['reference'])}")
    run = out / "run.json"
    if stage in ("sft", "dpo") and run.exists():
        lines += next_steps(stage, json.loads(run.read_text(encoding="utf-8"))["config"], remote)
    return "\n".join(lines) + "\n"


def next_steps(stage: str, config: dict, remote: str) -> list[str]:
    """The summary's last lines: the command that continues from this run's adapter (after SFT, DPO on it; after DPO,
    the merge), and how to load the adapter in Python."""
    import shlex

    adapter = storage.parse_uri(remote).join("adapter")
    base = config["base_model"]
    common = f"JOB_BASE_MODEL={shlex.quote(base)} JOB_ADAPTER={shlex.quote(str(adapter))} JOB_OUTPUT={shlex.quote(config['output'])}"
    if stage == "sft":
        lines = ["  next: preference tuning (DPO) on this adapter, with pairs (prompt, chosen, rejected) of yours:",
                 f"    JOB_STAGE=dpo {common} JOB_DATA=<your pairs> qlora-job"]
    else:
        lines = ["  next: a merged model for serving engines (vLLM, TGI):", f"    JOB_STAGE=merge {common} qlora-job"]
    model = storage.as_model_uri(base)
    base_ref = model.repo_id if isinstance(model, storage.HfUri) else str(model)
    if isinstance(adapter, storage.HfUri):
        load = f"PeftModel.from_pretrained(base, {adapter.repo_id!r}, subfolder={adapter.path!r})"
    elif isinstance(adapter, storage.S3Uri):
        load = f"PeftModel.from_pretrained(base, 'adapter')  # after: aws s3 cp --recursive {adapter}/ adapter/"
    else:
        load = f"PeftModel.from_pretrained(base, {str(adapter)!r})"
    # The 4-bit NF4 base: the model the adapter was trained with and its metrics describe.
    return lines + ["  load the adapter (transformers + peft):",
                    f"    base = AutoModelForCausalLM.from_pretrained({base_ref!r}, "
                    "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))",
                    f"    model = {load}"]

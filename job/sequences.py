"""Records -> the token sequences the trainer sees: the prompt format, the EOS check and the length policy.

Tokenization is TRL's: the prompt is rendered with `add_generation_prompt=True`, prompt + answer rendered whole, and the
trained part is what follows their common prefix. The job does it itself, before the model is downloaded, so that
`--check` and the run see exactly the same sequences, and so that two promises hold for every trained sequence:

- **It ends with a token generation stops on.** The trained part must contain a stop token (the tokenizer's EOS, or
  an EOS id of the model's generation config); tokens after the last one that render as whitespace only (ChatML's
  newline after `<|im_end|>`) are not trained, since generation never produces them. An answer without a stop token
  is a configuration error that names `JOB_TRAIN__EOS_TOKEN` and the token to set.
- **Its answer is whole.** `JOB_TRAIN__OVER_LENGTH=cut_prompt` (the default) keeps the whole answer and its EOS and
  cuts the prompt from its start (BOS kept); an example is dropped when what would be left of its prompt holds no
  text of it (the template's end, e.g. `\n### 回答\n`, is never cut). `drop` drops every example longer than
  `JOB_TRAIN__MAX_LENGTH`. DPO: both answers stay whole; the prompt is cut so that it fits with the
  longer one. What was cut or dropped is counted and its first rows named (log, metrics.json, --check); nothing left
  to train, or more than `JOB_MAX_OVER_LENGTH_SHARE` of the examples cut or dropped, is a data error (exit 3) naming
  `JOB_TRAIN__MAX_LENGTH` and the lengths that would keep 95% or all of them whole.

    >>> fitted = fit(records, "sft", tokenizer, max_length=1024, policy="cut_prompt", stops={2}, role="train")
    >>> fitted.rows[0].keys(), fitted.report["dropped"]
    (dict_keys(['input_ids', 'completion_mask']), 0)
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import ConfigError, DataError

log = logging.getLogger("job")

#: How many row names a report lists (first ones, in file order).
FIRST = 5


@dataclass
class Fitted:
    """Tokenized examples that fit, and what the policy did to get there."""

    rows: list[dict]
    report: dict
    lengths: list[int] = field(default_factory=list)  # per row: the tokens of its (longest) sequence


def stop_ids(tokenizer, model_dir: Path | None) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        import json

        eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def _ids(tokenizer, conversations: list[list[dict]], *, generation_prompt: bool) -> list[list[int]]:
    """Each conversation rendered and tokenized as TRL does, in one batched call (the tokenizer encodes the batch at
    once). Measured: 0.35 s less for preparing 1,729 examples on 2 CPU cores (2.13 -> 1.78 s), no change on the H200
    host (the data-to-plan step 2.4 -> 2.5 s, bench-13b-1204-run16/run17); the per-example figures cProfile gave were
    its own overhead."""
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(conversations, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    return [list(ids) for ids in out]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _trained_part(tokenizer, ids: list[int], stops: set[int], source: str) -> list[int]:
    """The answer's tokens up to and including its last stop token; raises ConfigError when there is none."""
    last = max((i for i, t in enumerate(ids) if t in stops), default=None)
    if last is not None and not tokenizer.decode(ids[last + 1 :]).strip():
        return ids[: last + 1]
    tail = tokenizer.convert_ids_to_tokens(ids[-3:])
    specials = [t for t in tokenizer.convert_ids_to_tokens(ids) if t in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())]
    stop_names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(stops)) or "none"
    hint = (f" The template ends answers with {specials[-1]!r}: set JOB_TRAIN__EOS_TOKEN={specials[-1]} so that it is "
            "trained as the end of every answer and generation stops on it.") if specials else (
            " Set JOB_TRAIN__EOS_TOKEN to the token the prompt format ends answers with, or use a prompt format that ends "
            "them with the tokenizer's EOS (JOB_PROMPT_FORMAT=instruction).")
    raise ConfigError(f"{source}: the trained part of the answer ends with {tail!r} and holds no token that generation "
                      f"stops on ({stop_names}): a tuned model would not stop after its answer.{hint}")


def _cut_prompt(prompt: list[int], budget: int, bos: int | None, tail: int, tokenizer) -> list[int] | None:
    """The prompt cut from its start to `budget` tokens (keeping BOS); None when what is left holds no text of the
    prompt: the template's last `tail` tokens (what follows the prompt's text: `\n### 回答\n`, the generation prompt)
    must stay whole, and at least one token before them must be text (a cut down to `<s>\n` trained answers to nothing)."""
    keep_bos = bool(prompt) and bos is not None and prompt[0] == bos
    room = budget - int(keep_bos)
    if room <= tail:
        return None
    kept = prompt[len(prompt) - room :]
    if not tokenizer.decode(kept[: len(kept) - tail]).strip():
        return None
    return ([prompt[0]] if keep_bos else []) + kept if room < len(prompt) - int(keep_bos) else prompt


def _common_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _template_tails(tokenizer, records: list[dict], prompts: dict[int, list[int]]) -> dict[int, int]:
    """For each record index given, how many of its prompt's last tokens are template, not text: the common end of its
    prompt and the same prompt with the last message's text left empty."""
    order = sorted(prompts)
    empty = [r["prompt"][:-1] + [{**r["prompt"][-1], "content": ""}] for r in (records[i] for i in order)]
    try:
        rendered = _ids(tokenizer, empty, generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses empty messages: only the text check below is left
        return dict.fromkeys(order, 0)
    return {i: _common_suffix(prompts[i], e) for i, e in zip(order, rendered)}


def fit(records: list[dict], stage: str, tokenizer, *, max_length: int, policy: str, stops: set[int], role: str,
        max_share: float = 1.0) -> Fitted:
    """Tokenize `records` (job/data.py's normalised records) for `stage` and apply the length policy; more than
    `max_share` of them cut or dropped is a DataError (JOB_MAX_OVER_LENGTH_SHARE)."""
    rows, lengths, whole = [], [], []
    trained = 0  # the tokens the trainer sees: a DPO pair is two sequences, each with the prompt
    cut, dropped = [], []
    answer_min, answer_max = None, 0
    keys = ["completion"] if stage == "sft" else ["chosen", "rejected"]
    prompts = _ids(tokenizer, [r["prompt"] for r in records], generation_prompt=True)
    all_fulls = _ids(tokenizer, [r["prompt"] + r[k] for r in records for k in keys], generation_prompt=False)
    fitted = []
    for i, r in enumerate(records):
        source = r.get("source") or f"{role} record {i + 1}"
        fulls = all_fulls[i * len(keys) : (i + 1) * len(keys)]
        n_prompt = min(_common_prefix(prompts[i], f) for f in fulls)
        parts = [_trained_part(tokenizer, f[n_prompt:], stops, source) for f in fulls]
        fitted.append((source, fulls[0][:n_prompt], parts))
        whole.append(n_prompt + max(len(p) for p in parts))
    # Only the examples to cut need to know where their prompt's text ends: one more batched call, for them alone.
    tails = _template_tails(tokenizer, records, {i: fitted[i][1] for i, n in enumerate(whole) if n > max_length}) \
        if policy == "cut_prompt" else {}
    for i, (source, prompt, parts) in enumerate(fitted):
        n_prompt = len(prompt)
        longest = max(len(p) for p in parts)
        answer_max = max(answer_max, longest)
        answer_min = longest if answer_min is None else min(answer_min, longest)
        if n_prompt + longest > max_length:
            short = _cut_prompt(prompt, max_length - longest, tokenizer.bos_token_id, tails[i], tokenizer) \
                if policy == "cut_prompt" else None
            if short is None:
                dropped.append(source)
                continue
            cut.append(source)
            prompt = short
        if stage == "sft":
            rows.append({"input_ids": prompt + parts[0], "completion_mask": [0] * len(prompt) + [1] * len(parts[0])})
        else:
            rows.append({"prompt_ids": prompt, "chosen_ids": parts[0], "rejected_ids": parts[1]})
        lengths.append(len(prompt) + longest)
        trained += sum(len(prompt) + len(p) for p in parts)
    report = {
        "records": len(records),
        "kept": len(rows),
        "policy": policy,
        "max_length": max_length,
        "prompt_cut": len(cut),
        "dropped": len(dropped),
        "first_prompt_cut": cut[:FIRST],
        "first_dropped": dropped[:FIRST],
        # Per epoch, as TRL counts them (num_tokens: non-padding tokens, both sequences of a DPO pair); the
        # percentiles are of each example's longest sequence, what JOB_TRAIN__MAX_LENGTH bounds.
        "tokens": trained,
        "tokens_p50": int(statistics.median(lengths)) if lengths else 0,
        "tokens_p95": _p95(lengths),
        "tokens_max": max(lengths, default=0),
        # Before the policy: the lengths JOB_TRAIN__MAX_LENGTH would need to keep 95% or all of the examples whole.
        "whole_p95": _p95(whole),
        "whole_max": max(whole, default=0),
    }
    if cut or dropped:
        log.warning("%s data: %d of %d examples longer than JOB_TRAIN__MAX_LENGTH=%d: %d had their prompt cut from the "
                    "start (first: %s), %d dropped (first: %s)", role, len(cut) + len(dropped), len(records), max_length,
                    len(cut), ", ".join(cut[:FIRST]) or "-", len(dropped), ", ".join(dropped[:FIRST]) or "-",
                    extra={"fields": {"event": "length_policy", "role": role, **report}})
    if not rows:
        what = "answer" if stage == "sft" else "longer answer"
        raise DataError(f"{role} data: none of the {len(records)} examples fits JOB_TRAIN__MAX_LENGTH={max_length} "
                        f"(JOB_TRAIN__OVER_LENGTH={policy}); with its EOS the shortest {what} takes {answer_min} tokens, "
                        f"the longest {answer_max}, and the prompt's template end and some of its text must fit too. Raise "
                        "JOB_TRAIN__MAX_LENGTH"
                        + (" or set JOB_TRAIN__OVER_LENGTH=cut_prompt" if policy == "drop" else ""))
    lost = len(cut) + len(dropped)
    if lost > max_share * len(records):
        raise DataError(f"{role} data: {lost} of {len(records)} examples ({lost / len(records):.0%}) are longer than "
                        f"JOB_TRAIN__MAX_LENGTH={max_length}: {len(cut)} would have their prompt cut, {len(dropped)} be "
                        f"dropped (JOB_TRAIN__OVER_LENGTH={policy}; first: {', '.join((cut + dropped)[:FIRST])}), more "
                        f"than JOB_MAX_OVER_LENGTH_SHARE={max_share:g} allows. JOB_TRAIN__MAX_LENGTH={report['whole_p95']} "
                        f"keeps 95% of them whole, {report['whole_max']} all of them; or raise JOB_MAX_OVER_LENGTH_SHARE")
    return Fitted(rows=rows, report=report, lengths=lengths)


def _p95(values: list[int]) -> int:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))] if values else 0


def rendered_example(tokenizer, row: dict, stage: str) -> dict:
    """One fitted example as text, split where the loss starts: what --check shows."""
    if stage == "sft":
        ids, mask = row["input_ids"], row["completion_mask"]
        start = mask.index(1)
        return {"prompt": tokenizer.decode(ids[:start]), "trained": tokenizer.decode(ids[start:])}
    return {"prompt": tokenizer.decode(row["prompt_ids"]), "chosen (trained)": tokenizer.decode(row["chosen_ids"]),
            "rejected (trained)": tokenizer.decode(row["rejected_ids"])}

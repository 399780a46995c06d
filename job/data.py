"""Reading training data into a `datasets.Dataset` in TRL's conversational form, with every problem reported as
`file: row N: what is wrong` before a model is loaded.

Files: JSON (an array, or one object per line), JSONL, CSV (header row; for DPO also a header-less
prompt,chosen,rejected file), Parquet. A directory (or a pulled S3/Hub prefix) is every such file in it.

Recognised SFT records (extra columns, e.g. ELYZA's `eval_aspect`, are ignored):
  text + output                  the seed's records (ichikara-instruction)
  instruction [+ input] + output Alpaca
  input + output                 ELYZA-tasks style
  prompt + completion            TRL's prompt-completion (strings or message lists)
  messages                       chat: [{"role": "system"|"user"|"assistant", "content": ...}, ...], ending with the answer
Recognised DPO records: prompt + chosen + rejected (strings, or message lists; chosen/rejected alone as full
conversations sharing the prompt), or a header-less CSV with those three columns in that order.

    >>> from job.data import load_dataset
    >>> ds = load_dataset(Path("train.jsonl"), "s3://bucket/train.jsonl", "sft", ColumnSettings())
    >>> ds[0]["prompt"], ds[0]["completion"]
    ([{'role': 'user', 'content': '...'}], [{'role': 'assistant', 'content': '...'}])
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.errors import DataError
from job.settings import ColumnSettings

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")


def data_files(path: Path, display: str) -> list[tuple[Path, str]]:
    """The data files at a local path, each with the name users know it by (its URI)."""
    if path.is_file():
        return [(path, display)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    if not files:
        raise DataError(f"{display}: no data files ({', '.join(SUPPORTED)}) found")
    base = display.rstrip("/")
    return [(p, f"{base}/{p.relative_to(path).as_posix()}") for p in files]


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = ""
        for enc in ("shift_jis", "cp932", "euc_jp"):
            try:
                raw.decode(enc)
                hint = f" (it decodes as {enc}: convert it with `iconv -f {enc} -t utf-8`)"
                break
            except UnicodeDecodeError:
                pass
        raise DataError(f"{name}: line {line}: not valid UTF-8{hint}") from None


def read_rows(path: Path, name: str, stage: str, columns: ColumnSettings) -> Iterator[tuple[int, Any]]:
    """Yield (row number, record) from one file; row numbers are 1-based data rows."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{name}: not a readable Parquet file ({exc})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    text = _decode(path.read_bytes(), name)
    if not text.strip():
        raise DataError(f"{name}: the file is empty")
    if suffix == ".csv":
        yield from _csv_rows(text, name, stage, columns)
        return
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        yield from enumerate(items, start=1)
        return
    row = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: row {row} (line {lineno}): invalid JSON ({exc.msg})") from None


def _csv_rows(text: str, name: str, stage: str, columns: ColumnSettings) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"{name}: line {reader.line_num}: invalid CSV ({exc})") from None
    header = [h.strip() for h in rows[0]]
    known = {"prompt", "chosen", "rejected", *(v for v in (columns.prompt, columns.chosen, columns.rejected) if v)}
    if stage == "dpo" and len(header) == 3 and not known & set(header):
        header, body = ["prompt", "chosen", "rejected"], rows  # the seed's header-less preference file
    else:
        body = rows[1:]
    for i, values in enumerate(body, start=1):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError(f"{name}: row {i}: {len(values)} fields, the header has {len(header)}")
        yield i, dict(zip(header, values))


# ----------------------------------------------------------------------------------------------- normalising


def _text(record: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{j}] must be {{'role': one of {ROLES}, 'content': text}}")
        if not m["content"].strip():
            raise DataError(f"{where}: {key}[{j}] ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_prompt(value: Any, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return [{"role": "user", "content": value}]
    msgs = _messages(value, key, where)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: field {key!r} has no user message")
    return msgs


def _as_answer(value: Any, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} (the answer) is empty")
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, key, where)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} must end with an assistant message")
    return msgs


def _sft_format(keys: set[str], c: ColumnSettings) -> str | None:
    if c.messages or "messages" in keys:
        return "messages"
    if (c.prompt or "prompt") in keys and (c.completion or "completion") in keys:
        return "prompt_completion"
    if (c.prompt or "instruction") in keys and (c.completion or "output") in keys:
        return "alpaca"
    if "text" in keys and "output" in keys:
        return "text_output"
    if "input" in keys and "output" in keys:
        return "input_output"
    return None


def _sft_record(rec: dict, fmt: str, c: ColumnSettings, where: str) -> dict:
    if fmt == "messages":
        key = c.messages or "messages"
        msgs = _messages(rec.get(key), key, where)
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError(f"{where}: {key!r} must contain a user message and end with the assistant's answer")
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    if fmt == "prompt_completion":
        pk, ck = c.prompt or "prompt", c.completion or "completion"
        if pk not in rec or ck not in rec:
            raise DataError(f"{where}: missing field {pk if pk not in rec else ck!r}")
        return {"prompt": _as_prompt(rec[pk], pk, where), "completion": _as_answer(rec[ck], ck, where)[-1:]}
    if fmt == "alpaca":
        pk, ck, ik = c.prompt or "instruction", c.completion or "output", c.input or "input"
        prompt = _text(rec, pk, where)
        extra = rec.get(ik)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field {ik!r} must be text, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return {"prompt": _as_prompt(prompt, pk, where), "completion": _as_answer(_text(rec, ck, where), ck, where)}
    pk = "text" if fmt == "text_output" else "input"
    return {"prompt": _as_prompt(_text(rec, pk, where), pk, where), "completion": _as_answer(_text(rec, "output", where), "output", where)}


def _dpo_record(rec: dict, c: ColumnSettings, where: str) -> dict:
    pk, ck, rk = c.prompt or "prompt", c.chosen or "chosen", c.rejected or "rejected"
    for k in (ck, rk):
        if k not in rec or rec[k] is None:
            raise DataError(f"{where}: missing field {k!r}")
    chosen, rejected = _as_answer(rec[ck], ck, where), _as_answer(rec[rk], rk, where)
    if pk in rec and rec[pk] is not None:
        prompt = _as_prompt(rec[pk], pk, where)
    elif len(chosen) > 1:  # implicit prompt: full conversations that share everything but the answer
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: no {pk!r} field, and {ck!r} and {rk!r} differ before the answer")
        prompt = _as_prompt(chosen[:-1], ck, where)
    else:
        raise DataError(f"{where}: missing field {pk!r}")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise DataError(f"{where}: {ck!r} and {rk!r} are the same answer")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


def load_records(path: Path, display: str, stage: str, columns: ColumnSettings, report: list | None = None) -> list[dict]:
    """Read and validate every file at `path`; returns normalised records (prompt as messages, answer as messages,
    `source`: file and row). `report`, when given, gets one entry per file read: name, format, records."""
    records: list[dict] = []
    for file, name in data_files(path, display):
        fmt = None
        before = len(records)
        for row, rec in read_rows(file, name, stage, columns):
            where = f"{name}: row {row}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object with named fields, got {type(rec).__name__}")
            if stage == "dpo":
                records.append({**_dpo_record(rec, columns, where), "source": where})
                fmt = "prompt_chosen_rejected"
                continue
            if fmt is None:
                fmt = _sft_format(set(rec), columns)
                if fmt is None:
                    raise DataError(
                        f"{where}: no recognised columns in {sorted(rec)}; expected text+output, instruction+output, "
                        "input+output, prompt+completion or messages (or map yours with JOB_COLUMNS__PROMPT and "
                        "JOB_COLUMNS__COMPLETION)"
                    )
            records.append({**_sft_record(rec, fmt, columns, where), "source": where})
        if len(records) == before:
            raise DataError(f"{name}: no records (only a header or blank lines)")
        if report is not None:
            report.append({"file": name, "format": fmt, "records": len(records) - before})
    return records


def to_dataset(records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(records)


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the records (at least one) for evaluation, reproducibly."""
    import random

    if not fraction:
        return records, []
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise DataError(f"JOB_EVAL_FRACTION={fraction} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def token_stats(records: list[dict], tokenizer, max_length: int) -> dict:
    """Token lengths as the trainer will see them (chat template applied; DPO: prompt + the longer answer)."""
    lengths = []
    for r in records:
        answers = [r["completion"]] if "completion" in r else [r["chosen"], r["rejected"]]
        lengths.append(max(len(tokenizer.apply_chat_template(r["prompt"] + a, tokenize=True, return_dict=False)) for a in answers))
    lengths.sort()
    return {
        "records": len(records),
        "tokens_total": sum(lengths),
        "tokens_p50": int(statistics.median(lengths)),
        "tokens_p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "tokens_max": lengths[-1],
        "over_max_length": sum(1 for n in lengths if n > max_length),
        "max_length": max_length,
    }

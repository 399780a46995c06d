"""Reading training data into records in TRL's conversational form (job/sequences.py tokenizes them), with every
problem reported as `file: row N: what is wrong` before a model is loaded.

Files: JSON (an array, or one object per line), JSONL, CSV (header row; for DPO also a header-less
prompt,chosen,rejected file, told from a header by `_looks_like_names`), Parquet. A directory (or a pulled S3/Hub
prefix) is every such file in it.

Recognised SFT records (extra columns, e.g. ELYZA's `eval_aspect`, are ignored):
  text + output                  the seed's records (ichikara-instruction)
  instruction [+ input] + output Alpaca
  input + output                 ELYZA-tasks style
  prompt + completion            TRL's prompt-completion (strings or message lists)
  messages                       chat: [{"role": "system"|"user"|"assistant", "content": ...}, ...], ending with the answer
Recognised DPO records: prompt + chosen + rejected (strings, or message lists; chosen/rejected alone as full
conversations sharing the prompt), or a header-less CSV with those three columns in that order.

    >>> from job.data import load_records
    >>> recs = load_records(Path("train.jsonl"), "s3://bucket/train.jsonl", "sft", ColumnSettings())
    >>> recs[0]["prompt"], recs[0]["completion"], recs[0]["source"]
    ([{'role': 'user', 'content': '...'}], [{'role': 'assistant', 'content': '...'}], 's3://bucket/train.jsonl: row 1')
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.errors import DataError
from job.settings import ColumnSettings

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
_SPACE = re.compile(r"\s*")

log = logging.getLogger(__name__)


def _hidden(rel: Path) -> bool:
    # Editors, notebooks and macOS leave these beside the data (.ipynb_checkpoints/, .DS_Store, ._name): reading
    # them would silently duplicate or corrupt the training set.
    return any(part.startswith(".") for part in rel.parts)


#: Files the job writes into a run folder ({JOB_OUTPUT}/{run_id}/): a folder holding one of them (and everything
#: under it: adapter/, checkpoints/) is a run's output, not data, when JOB_OUTPUT lies inside the data folder.
RUN_MARKERS = ("identity.json", "run.json", "_SUCCESS")


def _suffix(path: Path) -> str:
    """The data type of a file name: `.jsonl`, or `.jsonl.gz` for a gzip-compressed one."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[1] == ".gz":
        return "".join(suffixes)
    return path.suffix.lower()


def _supported(suffix: str) -> bool:
    return suffix.removesuffix(".gz") in SUPPORTED and suffix != ".parquet.gz"


def data_files(path: Path, display: str, ignored: list[str] | None = None) -> list[tuple[Path, str]]:
    """The data files at a local path, each with the name users know it by (its URI). Under a directory, hidden
    files and anything in hidden folders are skipped, and so are files of other types and the job's own run folders
    (RUN_MARKERS); their names are appended to `ignored` when given. A file named directly is read whatever its name."""
    if path.is_file():
        return [(path, display)]
    base = display.rstrip("/")
    runs = {m.parent for name in RUN_MARKERS for m in path.rglob(name)}
    files = []
    for p in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = p.relative_to(path)
        if _hidden(rel) or not _supported(_suffix(p)) or any(d in runs for d in p.parents):
            if ignored is not None:
                ignored.append(f"{base}/{rel.as_posix()}")
        else:
            files.append((p, f"{base}/{rel.as_posix()}"))
    if not files:
        raise DataError(f"{display}: no data files ({', '.join(SUPPORTED)}, or .jsonl.gz, .json.gz, .csv.gz) found"
                        + (f"; skipped: {_first(ignored)}" if ignored else ""))
    return files


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[:200].count(b"\x00") * 4 >= len(raw[:200]):
            # Windows editors and Excel's "Unicode text" write UTF-16: a BOM, or a zero byte beside every ASCII one.
            raise DataError(f"{name}: not valid UTF-8: it looks like UTF-16 (as Windows tools save \"Unicode\" text): "
                            "convert it with `iconv -f utf-16 -t utf-8 in > out`, or save it as UTF-8") from None
        hint = ""
        for enc in ("shift_jis", "cp932", "euc_jp"):
            try:
                raw.decode(enc)
                hint = f" (it decodes as {enc}: convert it with `iconv -f {enc} -t utf-8`)"
                break
            except UnicodeDecodeError:
                pass
        raise DataError(f"{name}: line {line}: not valid UTF-8{hint}") from None


def _json(text: str):
    """json.loads, with every way it can fail as one ValueError (deep nesting raises RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}: invalid JSON ({exc.msg})"
    return f"invalid JSON ({exc})"


def _spans_lines(text: str) -> bool:
    """Whether the text is a stream of JSON values that don't keep to one line each (pretty-printed objects)."""
    decoder, i, n = json.JSONDecoder(), 0, 0
    try:
        while (i := _SPACE.match(text, i).end()) < len(text):
            _, i = decoder.raw_decode(text, i)
            n += 1
    except (ValueError, RecursionError):
        return False
    return n > 0


def read_rows(path: Path, name: str, stage: str, columns: ColumnSettings) -> Iterator[tuple[int, Any]]:
    """Yield (row number, record) from one file; row numbers are 1-based data rows. `stage` decides what a CSV's
    first line must be: "sft", "dpo", or "prompts" (a file of prompts: a header with a prompt column, or an SFT one)."""
    suffix = _suffix(path)
    if not _supported(suffix):
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED)} (.jsonl, .json "
                        "and .csv also gzip-compressed: .jsonl.gz)")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty")
    raw = None
    if suffix.endswith(".gz"):
        import gzip
        import zlib

        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name}: not a readable gzip file ({exc})") from None
        suffix = suffix.removesuffix(".gz")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise DataError(f"{name}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        yield from enumerate(rows, start=1)
        return
    text = _decode(path.read_bytes() if raw is None else raw, name)
    if not text.strip():
        raise DataError(f"{name}: the file is empty")
    if suffix == ".csv":
        yield from _csv_rows(text, name, stage, columns)
        return
    lines = text.splitlines()
    if suffix == ".json":
        # A .json file is an array of records, or JSON Lines under another name; tell them apart by parsing it whole.
        try:
            whole = _json(text)
        except ValueError as exc:
            if text.lstrip().startswith("["):
                raise DataError(f"{name}: {_json_error(exc)}") from None
            whole = None  # several values: JSON Lines, read below
        if isinstance(whole, list):
            yield from enumerate(whole, start=1)
            return
        spread = sum(1 for line in lines if line.strip()) > 1
        if isinstance(whole, dict) and spread:
            lists = [k for k, v in whole.items() if isinstance(v, list)]
            hint = (f"; the records may be the list under {lists[0]!r} ({len(whole[lists[0]])} items): extract it with "
                    f"`jq '.{lists[0]}' {path.name}`" if len(lists) == 1 else "")
            raise DataError(f"{name}: the file is one JSON object spread over {len(lines)} lines (keys: "
                            f"{', '.join(sorted(whole)[:8])}), not records: write a JSON array of objects "
                            f"[{{...}}, {{...}}] or one object per line (JSON Lines){hint}")
        if whole is not None and not isinstance(whole, dict):
            raise DataError(f"{name}: the file holds a single JSON {type(whole).__name__}, not records: write a JSON "
                            "array of objects or one object per line (JSON Lines)")
    row = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row += 1
        try:
            value = _json(line)
        except ValueError as exc:
            hint = ""
            if _spans_lines(text):
                hint = ": the objects span several lines; JSON Lines needs one object per line (`jq -c . in > out.jsonl`)"
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise DataError(f"{name}: row {row} (line {lineno}): invalid JSON ({reason}){hint}") from None
        yield row, value


def _looks_like_names(values: list[str], body: list[list[str]] = ()) -> bool:
    """A header line: every value a short column name (`question`, `good_answer`, `Chosen response`, `質問`), not text.

    ASCII names are told from data by their form alone. Names in other scripts (`質問,良い回答,悪い回答`) look like a
    short row of data, so they count as a header only when the rows below are clearly longer (their median at least
    three times line 1's length): a header-less file whose first row is as short as the rest stays data. A row taken
    for a header by mistake fails loudly (it names no prompt, chosen and rejected columns); a header taken for data
    would be trained on."""
    names = [v.strip() for v in values]
    if len(set(names)) != len(names) or not all(len(v) <= 32 for v in names):
        return False
    if all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(?:[ ._-][A-Za-z0-9_]+){0,2}", v) for v in names):
        return True
    if not all(re.fullmatch(r"[^\W\d_]\w*(?:[ ._-]\w+){0,2}", v) for v in names):
        return False  # sentence punctuation, spaces, a leading digit: text
    lengths = sorted(sum(len(v.strip()) for v in row) for row in body if any(v.strip() for v in row))
    return bool(lengths) and lengths[len(lengths) // 2] >= 3 * sum(len(v) for v in names)


def _csv_rows(text: str, name: str, stage: str, columns: ColumnSettings) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"{name}: line {reader.line_num}: invalid CSV ({exc})") from None
    first = [h.strip() for h in rows[0]]
    c = columns
    if stage == "dpo":
        need = {"JOB_COLUMNS__PROMPT": c.prompt or "prompt", "JOB_COLUMNS__CHOSEN": c.chosen or "chosen",
                "JOB_COLUMNS__REJECTED": c.rejected or "rejected"}
        if set(need.values()) & set(first) or _looks_like_names(first, rows[1:]):
            missing = {var: col for var, col in need.items() if col not in first}
            if missing:
                raise DataError(
                    f"{name}: the header {','.join(first)} has no column {', '.join(map(repr, missing.values()))}: name "
                    f"the columns prompt,chosen,rejected, or set {', '.join(missing)} to the names of yours (if line 1 "
                    "is data, add the header line prompt,chosen,rejected)")
            header, body = first, rows[1:]
        elif len(first) == 3:
            header, body = ["prompt", "chosen", "rejected"], rows  # the seed's header-less preference file
        else:
            raise DataError(
                f"{name}: line 1 has {len(first)} columns and is not a header naming prompt, chosen and rejected; a "
                "file without a header must have exactly three columns (prompt, chosen, rejected in that order): add "
                "a header line, and map its names with JOB_COLUMNS__PROMPT, __CHOSEN and __REJECTED if they differ")
    else:
        header, body = first, rows[1:]
        if _sft_format(set(header), c) is None and not (stage == "prompts" and (c.prompt or "prompt") in header):
            raise DataError(
                f"{name}: the header {','.join(header)} names no recognised columns; expected text,output or "
                "instruction,output (optionally input) or input,output or prompt,completion; or set "
                "JOB_COLUMNS__PROMPT and JOB_COLUMNS__COMPLETION (and JOB_COLUMNS__INPUT) to the names of yours")
    for i, values in enumerate(body, start=1):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            what = "the header has" if header is first else "a file without a header needs"
            raise DataError(f"{name}: row {i}: {len(values)} fields, {what} {len(header)}")
        yield i, dict(zip(header, values))


# ----------------------------------------------------------------------------------------------- normalising


def _valid(value: str, key: str, where: str) -> str:
    # JSON's \\ud800 escapes decode to lone surrogates, which Arrow and the tokenizer can't encode: fail here, named.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field {key!r} contains an invalid character ({exc.reason}: {value[exc.start]!r})") from None
    return value


def _text(record: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _valid(value, key, where)


def _messages(value: Any, key: str, where: str) -> list[dict]:
    if value is not None and not isinstance(value, (str, list, dict)):
        # A number or a date where text belongs (Parquet and JSON keep the column's type): say so, not "messages".
        raise DataError(f"{where}: column {key!r} must be text, got {type(value).__name__} {value!r}: store it as text "
                        "(a string column)")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{j}] must be {{'role': one of {ROLES}, 'content': text}}")
        if not m["content"].strip():
            raise DataError(f"{where}: {key}[{j}] ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": _valid(m["content"], f"{key}[{j}]", where)})
    return out


def _as_prompt(value: Any, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return [{"role": "user", "content": _valid(value, key, where)}]
    msgs = _messages(value, key, where)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: field {key!r} has no user message")
    return msgs


def _as_answer(value: Any, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} (the answer) is empty")
        return [{"role": "assistant", "content": _valid(value, key, where)}]
    msgs = _messages(value, key, where)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} must end with an assistant message")
    return msgs


def _sft_format(keys: set[str], c: ColumnSettings) -> tuple[str, dict] | None:
    """The record format and the column read for each part, e.g. ("alpaca", {"prompt": "instruction", "input":
    "input", "completion": "output"}); None when the columns match none."""
    if c.messages or ("messages" in keys and not (c.prompt or c.completion)):
        return "messages", {"messages": c.messages or "messages"}
    candidates = [
        ("prompt_completion", c.prompt or "prompt", c.completion or "completion"),
        ("alpaca", c.prompt or "instruction", c.completion or "output"),
    ]
    if not (c.prompt or c.completion):  # columns the user named must be there, not replaced by a guess
        candidates += [("text_output", "text", "output"), ("input_output", "input", "output")]
    for fmt, pk, ck in candidates:
        if pk in keys and ck in keys:
            # Alpaca's optional `input` is part of the prompt, also when its columns are named with JOB_COLUMNS__*.
            ik = c.input or ("input" if pk == "instruction" else None)
            if ik in (pk, ck):
                ik = None
            return ("alpaca" if ik and fmt == "prompt_completion" else fmt), {"prompt": pk, "input": ik, "completion": ck}
    return None


def _no_format(keys: set[str], c: ColumnSettings, where: str) -> DataError:
    mapped = {f"JOB_COLUMNS__{k.upper()}": v for k, v in (("prompt", c.prompt), ("completion", c.completion)) if v}
    absent = {var: col for var, col in mapped.items() if col not in keys}
    if absent:
        return DataError(f"{where}: {', '.join(f'{var}={col!r}' for var, col in absent.items())}: no such column "
                         f"(the columns are {', '.join(sorted(keys)) or 'none'})")
    return DataError(
        f"{where}: no recognised columns in {sorted(keys)}; expected text+output, instruction+output, input+output, "
        "prompt+completion or messages (or map yours with JOB_COLUMNS__PROMPT and JOB_COLUMNS__COMPLETION)"
    )


def _sft_record(rec: dict, fmt: str, cols: dict, where: str) -> dict:
    if fmt == "messages":
        key = cols["messages"]
        msgs = _messages(rec.get(key), key, where)
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError(f"{where}: {key!r} must contain a user message and end with the assistant's answer")
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    pk, ik, ck = cols["prompt"], cols["input"], cols["completion"]
    for k in (pk, ck):
        if k not in rec or rec[k] is None:
            raise DataError(f"{where}: missing field {k!r}")
    prompt = rec[pk]
    extra = rec.get(ik) if ik else None
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: field {ik!r} must be text, got {type(extra).__name__}")
    if extra and extra.strip():
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field {ik!r} can only be added to a text {pk!r}, not to messages")
        prompt = f"{prompt}\n\n{_valid(extra, ik, where)}"
    if fmt in ("prompt_completion", "alpaca"):  # TRL's prompt-completion: strings or message lists
        return {"prompt": _as_prompt(prompt, pk, where), "completion": _as_answer(rec[ck], ck, where)[-1:]}
    return {"prompt": _as_prompt(_text({pk: prompt}, pk, where), pk, where),
            "completion": _as_answer(_text(rec, ck, where), ck, where)}


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
    """Read and validate every file at `path`; returns normalised records (prompt as messages, answer as messages),
    each with `source`: "<file>: row N", where it came from.

    `report`, when given, gets one entry per file read: {"file", "format", "columns" (which column holds each part),
    "records"}. Hidden files and folders under a directory are skipped (and logged)."""
    records: list[dict] = []
    ignored: list[str] = []
    files = data_files(path, display, ignored)
    if ignored:
        log.info("%s: skipped %d file(s) that are hidden, of another type, or in the job's own run folders: %s",
                 display, len(ignored), _first(ignored))
    for file, name in files:
        fmt, cols, seen = None, None, set()
        before = len(records)
        for row, rec in read_rows(file, name, stage, columns):
            where = f"{name}: row {row}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object with named fields, got {type(rec).__name__}")
            if any(not isinstance(k, str) for k in rec):
                raise DataError(f"{where}: field names must be text")
            seen.update(rec)
            if stage == "dpo":
                record = _dpo_record(rec, columns, where)
                if fmt is None:
                    pk = columns.prompt or "prompt"
                    fmt = "preference" if rec.get(pk) is not None else "preference_implicit_prompt"
                    cols = {"prompt": pk if fmt == "preference" else None,
                            "chosen": columns.chosen or "chosen", "rejected": columns.rejected or "rejected"}
            else:
                if fmt is None:
                    found = _sft_format(set(rec), columns)
                    if found is None:
                        raise _no_format(set(rec), columns, where)
                    fmt, cols = found
                record = _sft_record(rec, fmt, cols, where)
            record["source"] = where
            records.append(record)
        if len(records) == before:
            raise DataError(f"{name}: no records (only a header or blank lines)")
        if columns.input and stage == "sft" and columns.input not in seen:
            log.warning("%s: JOB_COLUMNS__INPUT=%r is not a column of this file (its columns: %s)",
                        name, columns.input, ", ".join(sorted(seen)))
        if report is not None:
            report.append({"file": name, "format": fmt, "columns": cols, "records": len(records) - before})
    return records


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

import json

import pytest

from job.data import load_records, split_eval
from job.errors import DataError
from job.settings import ColumnSettings

USER = lambda t: [{"role": "user", "content": t}]  # noqa: E731
ASSISTANT = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731


def write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def load(path, stage="sft", **cols):
    return load_records(path, f"s3://b/{path.name}", stage, ColumnSettings(**cols))


@pytest.mark.parametrize("row, prompt", [
    ({"ID": "1", "text": "質問", "output": "回答"}, "質問"),  # the seed's ichikara records
    ({"instruction": "質問", "input": "", "output": "回答"}, "質問"),  # Alpaca
    ({"instruction": "質問", "input": "文脈", "output": "回答"}, "質問\n\n文脈"),
    ({"input": "質問", "output": "回答", "eval_aspect": "ignored"}, "質問"),  # ELYZA-tasks-100
    ({"prompt": "質問", "completion": "回答"}, "質問"),
])
def test_sft_formats(tmp_path, row, prompt):
    recs = load(write(tmp_path / "d.jsonl", [row]))
    assert recs == [{"prompt": USER(prompt), "completion": ASSISTANT("回答"), "source": "s3://b/d.jsonl: row 1"}]


def test_chat_messages_and_json_array_and_parquet_and_csv(tmp_path):
    msgs = [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "a.json").write_text(json.dumps([{"messages": msgs}]), encoding="utf-8")
    assert load(tmp_path / "a.json") == [{"prompt": msgs[:2], "completion": msgs[2:], "source": "s3://b/a.json: row 1"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Q"], "output": ["A"]}), tmp_path / "p.parquet")
    assert load(tmp_path / "p.parquet")[0]["completion"] == ASSISTANT("A")
    (tmp_path / "c.csv").write_text("instruction,output\nQ,\"A, with comma\"\n", encoding="utf-8")
    assert load(tmp_path / "c.csv")[0]["completion"] == ASSISTANT("A, with comma")


def test_column_mapping(tmp_path):
    recs = load(write(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}]), prompt="question", completion="answer")
    assert recs == [{"prompt": USER("Q"), "completion": ASSISTANT("A"), "source": "s3://b/d.jsonl: row 1"}]


def test_directory_reads_every_file(tmp_path):
    write(tmp_path / "a.jsonl", [{"text": "Q1", "output": "A1"}])
    write(tmp_path / "sub" / "b.jsonl" if (tmp_path / "sub").mkdir() is None else None, [{"text": "Q2", "output": "A2"}])
    (tmp_path / "notes.md").write_text("ignored")
    assert len(load_records(tmp_path, "s3://b/data/", "sft", ColumnSettings())) == 2


def test_dpo_headerless_csv_like_the_seed(tmp_path):
    (tmp_path / "pref.csv").write_text("質問1,良い回答,悪い回答\n質問2,\"良い, 回答\",悪い\n", encoding="utf-8")
    recs = load(tmp_path / "pref.csv", "dpo")
    assert len(recs) == 2  # the first line is data, not a header
    assert recs[0] == {"prompt": USER("質問1"), "chosen": ASSISTANT("良い回答"), "rejected": ASSISTANT("悪い回答"),
                       "source": "s3://b/pref.csv: row 1"}


def test_dpo_standard_and_conversational(tmp_path):
    write(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"chosen": USER("Q") + ASSISTANT("good"), "rejected": USER("Q") + ASSISTANT("bad")},  # implicit prompt
    ])
    recs = load(tmp_path / "p.jsonl", "dpo")
    pair = {"prompt": USER("Q"), "chosen": ASSISTANT("good"), "rejected": ASSISTANT("bad")}
    assert recs == [{**pair, "source": "s3://b/p.jsonl: row 1"}, {**pair, "source": "s3://b/p.jsonl: row 2"}]


@pytest.mark.parametrize("rows, message", [
    ([{"text": "Q", "output": "A"}, {"text": "Q2"}], "row 2: missing field 'output'"),
    ([{"text": "Q", "output": "A"}, {"text": "Q", "output": "  "}], "row 2: field 'output' is empty"),
    ([{"text": "Q", "output": 42}], "row 1: field 'output' must be text, got int"),
    ([{"question": "Q", "reply": "A"}], "row 1: no recognised columns in ['question', 'reply']"),
    ([{"messages": [{"role": "user", "content": "Q"}]}], "row 1: 'messages' must contain a user message and end with the assistant's answer"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    with pytest.raises(DataError) as e:
        load(write(tmp_path / "train.jsonl", rows))
    assert str(e.value).startswith("s3://b/train.jsonl: ") and message in str(e.value)


def test_dpo_errors(tmp_path):
    write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match="p.jsonl: row 1: 'chosen' and 'rejected' are the same answer"):
        load(tmp_path / "p.jsonl", "dpo")
    (tmp_path / "x.csv").write_text("prompt,chosen,rejected\n1,2\n")
    with pytest.raises(DataError, match="x.csv: row 1: 2 fields, the header has 3"):
        load(tmp_path / "x.csv", "dpo")


def test_file_level_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "sjis.csv").write_bytes("text,output\n質問,回答\n".encode("shift_jis"))
    with pytest.raises(DataError, match=r"sjis.csv: line 2: not valid UTF-8 \(it decodes as shift_jis"):
        load(tmp_path / "sjis.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "Q", "output": "A"}\n{"text": "Q",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2 \(line 2\): invalid JSON"):
        load(tmp_path / "bad.jsonl")
    (tmp_path / "header_only.csv").write_text("text,output\n", encoding="utf-8")
    with pytest.raises(DataError, match="header_only.csv: no records"):
        load(tmp_path / "header_only.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load(tmp_path / "d.txt")


def test_eval_split_is_reproducible_and_disjoint():
    recs = [{"i": i} for i in range(20)]
    a, b = split_eval(recs, 0.1, seed=1)
    assert len(b) == 2 and len(a) == 18 and not set(map(str, a)) & set(map(str, b))
    assert split_eval(recs, 0.1, seed=1) == (a, b)


# ------------------------------------------------------------------------------------------------- data hygiene


def test_hidden_files_and_folders_are_skipped_and_the_report_lists_what_was_read(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "Q1", "output": "A1"}, {"text": "Q2", "output": "A2"}])
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter's copy of the same file: reading it duplicates the data
    write(tmp_path / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [{"text": "Q1", "output": "A1"}])
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # AppleDouble, not JSON
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    write(tmp_path / "sub" / ".git" / "x.jsonl", [{"text": "Q", "output": "A"}])
    (tmp_path / "sub" / "more.csv").write_text("instruction,output\nQ3,A3\n", encoding="utf-8")
    report = []
    recs = load_records(tmp_path, "s3://b/data/", "sft", ColumnSettings(), report)
    assert [r["source"] for r in recs] == ["s3://b/data/sub/more.csv: row 1", "s3://b/data/train.jsonl: row 1",
                                           "s3://b/data/train.jsonl: row 2"]
    assert report == [
        {"file": "s3://b/data/sub/more.csv", "format": "alpaca", "records": 1,
         "columns": {"prompt": "instruction", "input": "input", "completion": "output"}},
        {"file": "s3://b/data/train.jsonl", "format": "text_output", "records": 2,
         "columns": {"prompt": "text", "input": None, "completion": "output"}},
    ]
    # A hidden file named on purpose is read.
    assert len(load(tmp_path / ".ipynb_checkpoints" / "train-checkpoint.jsonl")) == 1


def _header_refused_then_mapped(path, header: str) -> list[dict]:
    """A DPO CSV whose header maps no column: refused, naming the file, the header and the three variables; then
    read with those variables set to the header's names (its records)."""
    with pytest.raises(DataError) as e:
        load(path, "dpo")
    msg = str(e.value)
    assert msg.startswith(f"s3://b/{path.name}: the header {header} has no column 'prompt', 'chosen', 'rejected'")
    assert "JOB_COLUMNS__PROMPT, JOB_COLUMNS__CHOSEN, JOB_COLUMNS__REJECTED" in msg
    prompt, chosen, rejected = header.split(",")
    return load(path, "dpo", prompt=prompt, chosen=chosen, rejected=rejected)


def test_dpo_csv_header_that_does_not_map_is_refused_not_trained_as_a_pair(tmp_path):
    (tmp_path / "pairs.csv").write_text("question,good,bad\n日本の首都は？,東京です。,大阪です。\n", encoding="utf-8")
    # ... and with the variables it names, the same file trains: one pair, the header is not a row.
    recs = _header_refused_then_mapped(tmp_path / "pairs.csv", "question,good,bad")
    assert recs == [{"prompt": USER("日本の首都は？"), "chosen": ASSISTANT("東京です。"), "rejected": ASSISTANT("大阪です。"),
                     "source": "s3://b/pairs.csv: row 1"}]


def test_dpo_csv_header_naming_some_columns_says_which_are_missing(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,good,bad\nQ,A,B\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv: the header prompt,good,bad has no column 'chosen', 'rejected'.*"
                                        r"set JOB_COLUMNS__CHOSEN, JOB_COLUMNS__REJECTED to"):
        load(tmp_path / "p.csv", "dpo")


def test_the_shipped_headerless_preference_file_still_reads_every_line_as_a_pair():
    from conftest import DEMO_DATA

    text = (DEMO_DATA / "dpo.csv").read_text(encoding="utf-8")
    recs = load_records(DEMO_DATA / "dpo.csv", "dpo.csv", "dpo", ColumnSettings())
    assert len(recs) == len([line for line in text.splitlines() if line.strip()])
    assert recs[0]["prompt"] == USER("日本で一番高い山は何ですか？") and recs[0]["source"] == "dpo.csv: row 1"


def test_a_dpo_csv_header_in_japanese_is_never_trained_on(tmp_path):
    """Line 1 `質問,良い回答,悪い回答` above real pairs is a header: without a column mapping the file fails, naming the
    header and the variables (before this, it was read as a header-less file and line 1 became a training pair);
    with the mapping it reads the two pairs below it. A first row as short as the rest stays data (the seed's form)."""
    rows = "質問,良い回答,悪い回答\n日本で一番高い山は何ですか？,富士山です。標高は3776メートルです。,わかりません。\n" \
           "日本の首都はどこですか？,東京です。政治と経済の中心です。,大阪だと思います。\n"
    (tmp_path / "ja.csv").write_text(rows, encoding="utf-8")
    recs = _header_refused_then_mapped(tmp_path / "ja.csv", "質問,良い回答,悪い回答")
    assert [r["prompt"] for r in recs] == [USER("日本で一番高い山は何ですか？"), USER("日本の首都はどこですか？")]
    assert recs[0]["source"] == "s3://b/ja.csv: row 1"
    # Rows like line 1 below it: a header-less file, every line a pair.
    (tmp_path / "short.csv").write_text("質問,良い回答,悪い回答\n山,富士山,高尾山\n", encoding="utf-8")
    assert [r["prompt"] for r in load(tmp_path / "short.csv", "dpo")] == [USER("質問"), USER("山")]


def test_headerless_csv_with_four_columns_says_so(tmp_path):
    (tmp_path / "p.csv").write_text("質問,良い,悪い,メモ\n質問2,良い2,悪い2,メモ2\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load(tmp_path / "p.csv", "dpo")
    assert str(e.value).startswith("s3://b/p.csv: line 1 has 4 columns and is not a header naming prompt, chosen and rejected")
    assert "exactly three columns" in str(e.value) and "missing field" not in str(e.value)
    (tmp_path / "q.csv").write_text("質問,良い,悪い\n質問2,良い2,悪い2,メモ2\n", encoding="utf-8")
    with pytest.raises(DataError, match="q.csv: row 2: 4 fields, a file without a header needs 3"):
        load(tmp_path / "q.csv", "dpo")


def test_sft_csv_header_that_does_not_map_names_its_values_and_the_variables(tmp_path):
    (tmp_path / "s.csv").write_text("question,answer\nQ,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.csv: the header question,answer names no recognised columns.*"
                                        r"JOB_COLUMNS__PROMPT and JOB_COLUMNS__COMPLETION"):
        load(tmp_path / "s.csv")
    assert load(tmp_path / "s.csv", prompt="question", completion="answer")[0]["completion"] == ASSISTANT("A")


def test_mapped_column_that_is_absent_is_named(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl: row 1: JOB_COLUMNS__PROMPT='question': no such column \(the columns are "
                                        r"output, text\)"):
        load(write(tmp_path / "d.jsonl", [{"text": "Q", "output": "A"}]), prompt="question")


def test_pretty_printed_json_object_is_named_as_such(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"text": "Q", "output": "A"}, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load(tmp_path / "one.json")
    assert str(e.value).startswith("s3://b/one.json: the file is one JSON object spread over 4 lines (keys: output, text), "
                                   "not records: write a JSON array")
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": [{"text": "Q", "output": "A"}] * 3}, indent=2))
    with pytest.raises(DataError, match=r"the records may be the list under 'data' \(3 items\): extract it with "
                                        r"`jq '.data' wrapped.json`"):
        load(tmp_path / "wrapped.json")
    (tmp_path / "pretty.jsonl").write_text("\n".join(json.dumps({"text": f"Q{i}", "output": "A"}, indent=2) for i in range(2)))
    with pytest.raises(DataError, match=r"pretty.jsonl: row 1 \(line 1\): invalid JSON .*: the objects span several lines; "
                                        "JSON Lines needs one object per line"):
        load(tmp_path / "pretty.jsonl")
    (tmp_path / "num.json").write_text("42\n")
    with pytest.raises(DataError, match="num.json: the file holds a single JSON int, not records"):
        load(tmp_path / "num.json")


@pytest.mark.parametrize("text", [
    json.dumps([{"text": "Q1", "output": "A1"}, {"text": "Q2", "output": "A2"}]),  # an array on one line
    json.dumps([{"text": "Q1", "output": "A1"}, {"text": "Q2", "output": "A2"}], indent=2),  # pretty-printed array
    '{"text": "Q1", "output": "A1"}\n{"text": "Q2", "output": "A2"}\n',  # JSON Lines named .json
])
def test_json_file_forms_that_hold_records(tmp_path, text):
    (tmp_path / "d.json").write_text(text, encoding="utf-8")
    assert [r["prompt"] for r in load(tmp_path / "d.json")] == [USER("Q1"), USER("Q2")]


def test_alpaca_with_mapped_columns_keeps_input(tmp_path):
    rows = [{"instruction": "要約して", "input": "長い文章", "output": "要約"}]
    expected = USER("要約して\n\n長い文章")
    report = []
    recs = load_records(write(tmp_path / "a.jsonl", rows), "a.jsonl", "sft",
                        ColumnSettings(prompt="instruction", completion="output", input="input"), report)
    assert recs[0]["prompt"] == expected and report[0]["format"] == "alpaca"
    assert load(tmp_path / "a.jsonl", prompt="instruction", completion="output")[0]["prompt"] == expected
    # A differently named context column, mapped with JOB_COLUMNS__INPUT.
    rows = [{"q": "要約して", "ctx": "長い文章", "a": "要約"}]
    assert load(write(tmp_path / "b.jsonl", rows), prompt="q", completion="a", input="ctx")[0]["prompt"] == expected


def test_lone_surrogate_is_a_data_error(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "Q\\ud800", "output": "A"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s.jsonl: row 1: field 'text' contains an invalid character"):
        load(tmp_path / "s.jsonl")


# ------------------------------------------------------------------------------------------------- property-based

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

SUFFIXES = [".jsonl", ".json", ".csv", ".parquet"]
FIELDS = ["text", "output", "instruction", "input", "prompt", "completion", "messages", "chosen", "rejected", "x"]
# Lone surrogates (JSON's "\\ud800" escapes) and blank strings are the values a reader most easily lets through.
_strings = st.text(max_size=20) | st.sampled_from(["\ud800", "Q\udc00", "", "  "])
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]) | st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": _strings})
_value = _strings | st.lists(_message, max_size=3) | _json_values
# Records shaped like each recognised format (so that many get through to the checks on values), plus any fields.
SHAPES = [("text", "output"), ("instruction", "input", "output"), ("input", "output"), ("prompt", "completion"),
          ("messages",), ("prompt", "chosen", "rejected"), ("chosen", "rejected"), ()]
_record = st.sampled_from(SHAPES).flatmap(
    lambda keys: st.fixed_dictionaries({k: _value for k in keys}, optional={k: _value for k in FIELDS if k not in keys}))
_records = st.lists(_record, max_size=4)
_quick = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read(path, stage):
    try:
        recs = load_records(path, path.name, stage, ColumnSettings())
    except DataError as exc:
        assert str(exc).startswith(path.name), exc  # every error names the file
        return
    for r in recs:  # what comes out is what TRL and Arrow can take
        assert set(r) == ({"prompt", "completion", "source"} if stage == "sft" else {"prompt", "chosen", "rejected", "source"})
        json.dumps(r, ensure_ascii=False).encode("utf-8")


def test_deeply_nested_json_is_a_data_error(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "\n")
    for name in ("deep.json", "deep.jsonl"):
        with pytest.raises(DataError, match=f"{name}: .*invalid JSON"):
            load(tmp_path / name)


@_quick
@given(raw=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES), stage=st.sampled_from(["sft", "dpo"]))
def test_random_bytes_only_raise_data_error(tmp_path_factory, raw, suffix, stage):
    path = tmp_path_factory.mktemp("b") / f"d{suffix}"
    path.write_bytes(raw)
    _read(path, stage)


@_quick
@given(text=st.text(alphabet=st.sampled_from(list('{}[]",:\n\r 0aé\\\'\ufeff\x00')), max_size=80),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]), stage=st.sampled_from(["sft", "dpo"]))
def test_random_structured_text_only_raises_data_error(tmp_path_factory, text, suffix, stage):
    path = tmp_path_factory.mktemp("t") / f"d{suffix}"
    path.write_text(text, encoding="utf-8")
    _read(path, stage)


@_quick
@given(records=_records, suffix=st.sampled_from(SUFFIXES), stage=st.sampled_from(["sft", "dpo"]))
def test_random_records_only_raise_data_error(tmp_path_factory, records, suffix, stage):
    import csv

    path = tmp_path_factory.mktemp("r") / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        names = sorted({k for r in records for k in r})
        with open(path, "w", newline="", encoding="utf-8", errors="replace") as f:
            w = csv.writer(f)
            if names:
                w.writerow(names)
            for r in records:
                w.writerow([v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in (r.get(k) for k in names)])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(records), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            from hypothesis import reject

            reject()  # Arrow can't hold these mixed types, so no Parquet file can either
    _read(path, stage)


# ------------------------------------------------------------------------------------- data-folder surprises


def test_gzipped_files_are_read_and_other_types_in_a_folder_are_named_as_skipped(tmp_path, caplog):
    import gzip

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress('{"text": "Q1", "output": "A1"}\n'.encode()))
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress("instruction,output\nQ2,A2\n".encode()))
    (tmp_path / "README.md").write_text("# my data\n")
    (tmp_path / "old.zip").write_bytes(b"PK\x03\x04")
    with caplog.at_level("INFO", logger="job.data"):
        recs = load_records(tmp_path, "s3://b/data/", "sft", ColumnSettings())
    assert [r["source"] for r in recs] == ["s3://b/data/a.jsonl.gz: row 1", "s3://b/data/b.csv.gz: row 1"]
    assert recs[1]["completion"] == ASSISTANT("A2")
    assert "skipped 2 file(s)" in caplog.text and "s3://b/data/README.md" in caplog.text and "old.zip" in caplog.text
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz: not a readable gzip file"):
        load(tmp_path / "bad.jsonl.gz")


def test_a_run_folder_inside_the_data_folder_is_skipped_not_read_as_data(tmp_path, caplog):
    """JOB_OUTPUT inside JOB_DATA's folder: the next run found metrics.json (a pretty-printed object) and failed with
    "one JSON object spread over N lines". The job's run folders (they hold identity.json, run.json or _SUCCESS)
    are not data; everything under them is skipped and named."""
    write(tmp_path / "train.jsonl", [{"text": "Q1", "output": "A1"}])
    run = tmp_path / "runs" / "sft-1"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"stage": "sft", "steps": 3}, indent=2))
    (run / "run.json").write_text(json.dumps({"run_id": "sft-1"}, indent=2))
    write(run / "generations.jsonl", [{"prompt": "Q", "before": "x", "after": "y"}])
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}, indent=2))
    failed = tmp_path / "runs" / "sft-2"  # a run that stopped early: only its identity was uploaded
    failed.mkdir()
    (failed / "identity.json").write_text(json.dumps({"stage": "sft"}, indent=2))
    with caplog.at_level("INFO", logger="job.data"):
        recs = load_records(tmp_path, "/data", "sft", ColumnSettings())
    assert [r["source"] for r in recs] == ["/data/train.jsonl: row 1"]
    assert "skipped 5 file(s)" in caplog.text and "/data/runs/sft-1/metrics.json" in caplog.text


def test_utf16_gets_a_hint_to_convert_it(tmp_path):
    for enc in ("utf-16", "utf-16-le"):  # with a BOM (Excel's "Unicode text", Notepad) and without
        (tmp_path / "d.jsonl").write_bytes('{"text": "質問", "output": "回答"}\n'.encode(enc))
        with pytest.raises(DataError, match=r"d.jsonl: not valid UTF-8: it looks like UTF-16 .*iconv -f utf-16 -t utf-8"):
            load(tmp_path / "d.jsonl")


@pytest.mark.parametrize("row, column", [
    ({"prompt": "1+1は？", "completion": 2}, "completion"),
    ({"instruction": "1+1は？", "output": 2.0}, "output"),
    ({"prompt": 7, "completion": "七"}, "prompt"),
])
def test_a_number_where_text_belongs_names_file_row_and_column(tmp_path, row, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "d.parquet")  # Parquet keeps the column's type: a number
    with pytest.raises(DataError, match=rf"s3://b/d.parquet: row 1: column '{column}' must be text, got "):
        load(tmp_path / "d.parquet")

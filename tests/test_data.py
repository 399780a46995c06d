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
    assert recs == [{"prompt": USER(prompt), "completion": ASSISTANT("回答")}]


def test_chat_messages_and_json_array_and_parquet_and_csv(tmp_path):
    msgs = [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "a.json").write_text(json.dumps([{"messages": msgs}]), encoding="utf-8")
    assert load(tmp_path / "a.json") == [{"prompt": msgs[:2], "completion": msgs[2:]}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Q"], "output": ["A"]}), tmp_path / "p.parquet")
    assert load(tmp_path / "p.parquet")[0]["completion"] == ASSISTANT("A")
    (tmp_path / "c.csv").write_text("instruction,output\nQ,\"A, with comma\"\n", encoding="utf-8")
    assert load(tmp_path / "c.csv")[0]["completion"] == ASSISTANT("A, with comma")


def test_column_mapping(tmp_path):
    recs = load(write(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}]), prompt="question", completion="answer")
    assert recs == [{"prompt": USER("Q"), "completion": ASSISTANT("A")}]


def test_directory_reads_every_file(tmp_path):
    write(tmp_path / "a.jsonl", [{"text": "Q1", "output": "A1"}])
    write(tmp_path / "sub" / "b.jsonl" if (tmp_path / "sub").mkdir() is None else None, [{"text": "Q2", "output": "A2"}])
    (tmp_path / "notes.md").write_text("ignored")
    assert len(load_records(tmp_path, "s3://b/data/", "sft", ColumnSettings())) == 2


def test_dpo_headerless_csv_like_the_seed(tmp_path):
    (tmp_path / "pref.csv").write_text("質問1,良い回答,悪い回答\n質問2,\"良い, 回答\",悪い\n", encoding="utf-8")
    recs = load(tmp_path / "pref.csv", "dpo")
    assert len(recs) == 2  # the first line is data, not a header
    assert recs[0] == {"prompt": USER("質問1"), "chosen": ASSISTANT("良い回答"), "rejected": ASSISTANT("悪い回答")}


def test_dpo_standard_and_conversational(tmp_path):
    write(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"chosen": USER("Q") + ASSISTANT("good"), "rejected": USER("Q") + ASSISTANT("bad")},  # implicit prompt
    ])
    recs = load(tmp_path / "p.jsonl", "dpo")
    assert recs[0] == recs[1] == {"prompt": USER("Q"), "chosen": ASSISTANT("good"), "rejected": ASSISTANT("bad")}


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

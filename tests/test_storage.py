from pathlib import Path

import pytest

from job import storage
from job.errors import DataError
from job.storage import HfUri, LocalUri, S3Uri, parse_uri

from conftest import keys


def test_parse_uri_forms():
    assert parse_uri("s3://bucket/a/b.jsonl") == S3Uri("bucket", "a/b.jsonl")
    assert parse_uri("s3://bucket/prefix/") == S3Uri("bucket", "prefix/")
    assert parse_uri("hf://llm-jp/llm-jp-3-13b@main") == HfUri("llm-jp/llm-jp-3-13b", "model", "main", "")
    assert parse_uri("hf://datasets/org/qa@v1/data/train.jsonl") == HfUri("org/qa", "dataset", "v1", "data/train.jsonl")
    assert parse_uri("relative/dir") == LocalUri(Path("relative/dir"))
    assert storage.as_model_uri("llm-jp/llm-jp-3-13b") == HfUri("llm-jp/llm-jp-3-13b", "model", None, "")
    for bad in ("gs://b/k", "s3://UPPER/k", "hf://noslash", "http://x/y"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_s3_roundtrip_file_and_prefix(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    remote = S3Uri(s3.bucket, "runs/r1")
    storage.push(src, remote)
    assert keys(s3, s3.bucket) == ["runs/r1/a.txt", "runs/r1/sub/b.txt"]
    path, ident = storage.pull(S3Uri(s3.bucket, "runs/r1/"), tmp_path / "dl")
    assert (path / "sub" / "b.txt").read_text() == "b" and ident["files"]["a.txt"]["etag"]
    path, _ = storage.pull(S3Uri(s3.bucket, "runs/r1/a.txt"), tmp_path / "one")
    assert path.read_text() == "a"
    assert storage.exists(remote.join("a.txt")) and not storage.exists(remote.join("nope"))
    assert storage.list_names(remote) == ["a.txt", "sub/b.txt"]


def test_s3_missing_object_is_a_data_error(s3, tmp_path):
    with pytest.raises(DataError, match=f"s3://{s3.bucket}/nothing/here.jsonl: no such object"):
        storage.pull(S3Uri(s3.bucket, "nothing/here.jsonl"), tmp_path)


@pytest.mark.parametrize("evil", ["data/../../escape.txt", "data//abs/escape.txt", "data/sub/../../../escape.txt"])
def test_prefix_download_refuses_traversal(s3, tmp_path, evil):
    s3.put_object(Bucket=s3.bucket, Key="data/ok.jsonl", Body=b"{}")
    s3.put_object(Bucket=s3.bucket, Key=evil, Body=b"pwned")
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(DataError, match="refusing to download"):
        storage.pull(S3Uri(s3.bucket, "data/"), dest)
    assert not list(tmp_path.rglob("escape.txt")) and not Path("/abs/escape.txt").exists()
    assert not (dest / "ok.jsonl").exists()  # names are all checked before anything is written


def test_local_push_and_pull(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    storage.push(tmp_path / "src", LocalUri(tmp_path / "out" / "run"))
    assert (tmp_path / "out" / "run" / "f").read_text() == "x"
    with pytest.raises(DataError, match="no such file"):
        storage.pull(LocalUri(tmp_path / "missing"), tmp_path / "x")

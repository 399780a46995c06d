"""Moving files between the job and its storage: the only module where boto3 and huggingface_hub do I/O.

One URI form for every input and output:
  s3://bucket/key, s3://bucket/prefix/        (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for MinIO, R2, GCS interop)
  hf://org/model[@revision][/path]            (a model repo)
  hf://datasets/org/name[@revision][/path]    (a dataset repo)
  /local/path or relative/path

    >>> from job.storage import parse_uri
    >>> parse_uri("hf://datasets/org/qa@v1.0/train.jsonl")
    HfUri(repo_id='org/qa', repo_type='dataset', revision='v1.0', path='train.jsonl')

Retries are the clients' own (botocore's standard mode, huggingface_hub's); what still fails is raised as
TransientError (retry the run) or as a permanent error when retrying can't help (not found, access denied).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from job.errors import ConfigError, DataError, JobError, TransientError

log = logging.getLogger(__name__)

_HF_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # "" for the whole bucket; ends with "/" for an explicit prefix

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Uri:
        base = self.key.rstrip("/")
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in ([base] if base else []) + list(parts)))


@dataclass(frozen=True)
class HfUri:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{kind}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")

    def join(self, *parts: str) -> HfUri:
        path = "/".join(p.strip("/") for p in ([self.path] if self.path else []) + list(parts))
        return HfUri(self.repo_id, self.repo_type, self.revision, path)


@dataclass(frozen=True)
class LocalUri:
    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def join(self, *parts: str) -> LocalUri:
        return LocalUri(self.path.joinpath(*parts))


Uri = S3Uri | HfUri | LocalUri


def parse_uri(text: str) -> Uri:
    """Parse one of the URI forms above; raises ValueError saying what is wrong."""
    if not text:
        raise ValueError("empty")
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"{text!r}: not a valid S3 bucket name {bucket!r}")
        return S3Uri(bucket, key)
    if text.startswith("hf://"):
        rest = text[5:]
        repo_type = "model"
        if rest.startswith("datasets/"):
            repo_type, rest = "dataset", rest[len("datasets/") :]
        m = re.fullmatch(rf"({_HF_REPO})(?:@([^/]+))?(?:/(.*))?", rest)
        if not m:
            raise ValueError(f"{text!r}: expected hf://org/name[@revision] or hf://datasets/org/name[@revision]")
        return HfUri(m.group(1), repo_type, m.group(2), (m.group(3) or "").strip("/"))
    if "://" in text:
        raise ValueError(f"{text!r}: unsupported scheme; use s3:// (also for S3-compatible stores), hf://, or a local path")
    return LocalUri(Path(text))


def as_model_uri(text: str) -> Uri:
    """Like parse_uri, plus the Hub's short form `org/name` when no such local directory exists."""
    uri = parse_uri(text)
    if isinstance(uri, LocalUri) and not uri.path.exists() and re.fullmatch(_HF_REPO + r"(@[^/]+)?", text):
        return parse_uri("hf://" + text)
    return uri


# ---------------------------------------------------------------------------------------------------------- S3


#: Attempts per S3 request (botocore's standard mode) unless AWS_MAX_ATTEMPTS or the profile's max_attempts says
#: otherwise. Standard mode waits rand(0,1) * min(0.05 s * 2**i, 20 s) before retry i for connection errors and 5xx
#: (1 s base for throttling): 12 attempts wait 33 s on average, at most 66 s, at least 12.5 s in 99% of cases, so a
#: storage restart or network blip of a few seconds is ridden out. Its former 9 attempts waited 6.4 s on average
#: (measured through tests/s3proxy.py: 9 attempts, 4.8 s), less than a MinIO restart.
S3_MAX_ATTEMPTS = 12


def _s3():
    import boto3
    import botocore.session
    from botocore.config import Config

    # Credentials, region and AWS_ENDPOINT_URL(_S3) come from the standard AWS chain; retries are botocore's.
    session = botocore.session.Session()
    retries = {"mode": "standard"}
    if session.get_config_variable("max_attempts") is None:
        retries["total_max_attempts"] = S3_MAX_ATTEMPTS
    return boto3.session.Session(botocore_session=session).client("s3", config=Config(retries=retries))


def _unwrap(exc: Exception) -> Exception:
    """The botocore error behind boto3's transfer errors (an upload's ClientError, a download's last failure)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return exc.last_exception
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def _s3_errors():
    """What an S3 call raises when storage, the network or the credentials fail (rather than a bug of ours)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, S3UploadFailedError, RetriesExceededError)


def _s3_error(exc: Exception, uri: S3Uri) -> JobError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    exc = _unwrap(exc)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigError(f"{uri}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a role)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchBucket", "NoSuchKey", "404") or status == 404:
            return DataError(f"{uri}: not found ({code or status})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return ConfigError(f"{uri}: access denied ({code or status}); check the credentials and the bucket policy")
        if status and status < 500 and status != 429:
            return ConfigError(f"{uri}: S3 refused the request ({code or status})")
    return TransientError(f"{uri}: S3 request failed after retries: {type(exc).__name__}: {exc}")


def _safe_dest(dest: Path, rel: str, source: str) -> Path:
    """The local path for a remote relative name; refuses names that would land outside dest."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or ".." in parts or "\\" in rel or any(p.startswith("/") for p in parts):
        raise DataError(f"{source}: refusing to download {rel!r}: the name would write outside {dest}")
    target = (dest / Path(*parts)).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(f"{source}: refusing to download {rel!r}: the name would write outside {dest}")
    return target


def _s3_list(client, uri: S3Uri) -> list[dict]:
    prefix = uri.key if uri.key.endswith("/") or not uri.key else uri.key + "/"
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        objects.extend(page.get("Contents", []))
    return [dict(o, rel=o["Key"][len(prefix) :]) for o in objects if not o["Key"].endswith("/")]


def _s3_pull(uri: S3Uri, dest: Path, include: list[str] | None) -> tuple[Path, dict]:
    from botocore.exceptions import ClientError

    client = _s3()
    try:
        if uri.key and not uri.key.endswith("/"):
            try:  # a single object?
                head = client.head_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
            else:
                name = PurePosixPath(uri.key).name
                target = _safe_dest(dest, name, str(uri))
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(uri.bucket, uri.key, str(target))
                return target, {"uri": str(uri), "files": {name: {"etag": head["ETag"].strip('"'), "size": head["ContentLength"]}}}
        objects = [o for o in _s3_list(client, uri) if _included(o["rel"], include)]
        if not objects:
            raise DataError(f"{uri}: no such object or prefix (or nothing under it)")
        files = {}
        for o in objects:
            target = _safe_dest(dest, o["rel"], str(uri))  # check every name before writing any file
            files[o["rel"]] = {"etag": o["ETag"].strip('"'), "size": o["Size"], "_target": target}
        for rel, meta in files.items():
            target = meta.pop("_target")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(uri.bucket, uri.key.rstrip("/") + "/" + rel if uri.key else rel, str(target))
        return dest, {"uri": str(uri), "files": files}
    except JobError:
        raise
    except _s3_errors() as exc:
        raise _s3_error(exc, uri) from None


def _s3_push(src: Path, uri: S3Uri) -> None:
    client = _s3()
    try:
        if src.is_file():
            client.upload_file(str(src), uri.bucket, uri.key)
            return
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            client.upload_file(str(path), uri.bucket, uri.join(path.relative_to(src).as_posix()).key)
    except _s3_errors() as exc:
        raise _s3_error(exc, uri) from None


# ---------------------------------------------------------------------------------------------------------- Hub


def _hf_error(exc: Exception, uri: HfUri) -> JobError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return ConfigError(f"{uri}: gated repository; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return DataError(f"{uri}: repository not found (or private: set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return DataError(f"{uri}: revision {uri.revision!r} not found")
    if isinstance(exc, EntryNotFoundError):
        return DataError(f"{uri}: file not found in the repository")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return ConfigError(f"{uri}: access denied ({exc.response.status_code}); check HF_TOKEN")
    return TransientError(f"{uri}: Hugging Face Hub request failed: {type(exc).__name__}")


def _hf_pull(uri: HfUri, dest: Path, include: list[str] | None, token: str | None) -> tuple[Path, dict]:
    from huggingface_hub import HfApi, snapshot_download

    patterns = [f"{uri.path}/{p}" if uri.path else p for p in include] if include else None
    if uri.path and not include:
        patterns = [uri.path, f"{uri.path}/*"]
    try:
        info = HfApi(token=token).repo_info(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
        # HF_HOME's cache keeps one copy across runs; the snapshot is pinned to the commit resolved just now.
        root = Path(
            snapshot_download(uri.repo_id, repo_type=uri.repo_type, revision=info.sha, allow_patterns=patterns, token=token)
        )
    except Exception as exc:  # huggingface_hub raises many types; all are mapped to a user-facing error
        raise _hf_error(exc, uri) from None
    path = root / uri.path if uri.path else root
    if not path.exists():
        raise DataError(f"{uri}: {uri.path!r} not found in the repository at {info.sha}")
    return path, {"uri": str(uri), "revision": info.sha}


def _hf_push(src: Path, uri: HfUri, token: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(uri.repo_id, repo_type=uri.repo_type, private=True, exist_ok=True)
        if src.is_file():
            api.upload_file(path_or_fileobj=str(src), path_in_repo=uri.path, repo_id=uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
        else:
            api.upload_folder(folder_path=str(src), path_in_repo=uri.path or None, repo_id=uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:
        raise _hf_error(exc, uri) from None


# ---------------------------------------------------------------------------------------------------------- API


def _included(rel: str, include: list[str] | None) -> bool:
    return include is None or any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(PurePosixPath(rel).name, p) for p in include)


def pull(uri: Uri, dest: Path, include: list[str] | None = None, token: str | None = None) -> tuple[Path, dict]:
    """Make `uri` available locally; returns (local path, identity for run.json).

    A single object becomes a file under `dest`, a prefix a directory tree; `include` keeps only names matching
    one of the glob patterns (applied to the relative name or the base name). Local paths are used in place.
    """
    dest = Path(dest)
    if isinstance(uri, LocalUri):
        if not uri.path.exists():
            raise DataError(f"{uri}: no such file or directory")
        return uri.path, {"uri": str(uri.path.resolve())}
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(uri, S3Uri):
        return _s3_pull(uri, dest, include)
    return _hf_pull(uri, dest, include, token)


def push(src: Path, uri: Uri, token: str | None = None) -> None:
    """Upload a file or a directory tree to `uri` (a key or prefix); overwrites what is there."""
    log.info("uploading %s -> %s", src, uri)
    if isinstance(uri, LocalUri):
        if src.is_file():
            uri.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, uri.path)
        else:
            shutil.copytree(src, uri.path, dirs_exist_ok=True)
    elif isinstance(uri, S3Uri):
        _s3_push(src, uri)
    else:
        _hf_push(src, uri, token)


def exists(uri: Uri, token: str | None = None) -> bool:
    """Whether a single object/file exists."""
    if isinstance(uri, LocalUri):
        return uri.path.exists()
    if isinstance(uri, S3Uri):
        from botocore.exceptions import ClientError

        try:
            _s3().head_object(Bucket=uri.bucket, Key=uri.key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise _s3_error(exc, uri) from None
        except _s3_errors() as exc:
            raise _s3_error(exc, uri) from None
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).file_exists(uri.repo_id, uri.path, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:
        if "RepositoryNotFound" in type(exc).__name__:
            return False
        raise _hf_error(exc, uri) from None


def list_names(uri: Uri, token: str | None = None) -> list[str]:
    """Relative names of all files under a prefix/directory (empty when there is none)."""
    if isinstance(uri, LocalUri):
        if not uri.path.is_dir():
            return []
        return sorted(p.relative_to(uri.path).as_posix() for p in uri.path.rglob("*") if p.is_file())
    if isinstance(uri, S3Uri):
        try:
            return sorted(o["rel"] for o in _s3_list(_s3(), uri))
        except _s3_errors() as exc:
            raise _s3_error(exc, uri) from None
    from huggingface_hub import HfApi

    try:
        files = HfApi(token=token).list_repo_files(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:
        if "RepositoryNotFound" in type(exc).__name__:
            return []
        raise _hf_error(exc, uri) from None
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    return sorted(f[len(prefix) :] for f in files if f.startswith(prefix))


def delete(uri: Uri, token: str | None = None) -> None:
    """Remove a prefix/directory (old checkpoints). Best effort: failures are logged, not raised."""
    try:
        if isinstance(uri, LocalUri):
            shutil.rmtree(uri.path, ignore_errors=True)
        elif isinstance(uri, S3Uri):
            client = _s3()
            keys = [{"Key": o["Key"]} for o in _s3_list(client, uri)]
            for i in range(0, len(keys), 1000):
                client.delete_objects(Bucket=uri.bucket, Delete={"Objects": keys[i : i + 1000]})
        else:
            from huggingface_hub import HfApi

            HfApi(token=token).delete_folder(uri.path, repo_id=uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:  # a leftover old checkpoint costs storage, not correctness
        log.warning("could not delete %s: %s", uri, type(exc).__name__)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))



# --------------------------------------------------------------------------------------- before any download


def identify(uri: Uri, include: list[str] | None = None, token: str | None = None) -> dict:
    """What `pull` would fetch, without fetching it: the run identity of a model or adapter (Hub commit, S3 ETags,
    local sizes and times) and the names of its files. An hf:// URI comes back pinned to the resolved commit
    (`identity["pinned"]`), so that the later download gets exactly what was identified."""
    if isinstance(uri, LocalUri):
        if not uri.path.exists():
            raise DataError(f"{uri}: no such file or directory")
        paths = [uri.path] if uri.path.is_file() else sorted(p for p in uri.path.rglob("*") if p.is_file())
        root = uri.path.parent if uri.path.is_file() else uri.path
        files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                 for p in paths if _included(p.relative_to(root).as_posix(), include)}
        return {"uri": str(uri.path.resolve()), "files": files}
    if isinstance(uri, S3Uri):
        from botocore.exceptions import BotoCoreError, ClientError

        client = _s3()
        try:
            if uri.key and not uri.key.endswith("/"):
                try:
                    head = client.head_object(Bucket=uri.bucket, Key=uri.key)
                    name = PurePosixPath(uri.key).name
                    return {"uri": str(uri), "files": {name: {"etag": head["ETag"].strip('"'), "size": head["ContentLength"]}}}
                except ClientError as exc:
                    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                        raise
            objects = [o for o in _s3_list(client, uri) if _included(o["rel"], include)]
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, uri) from None
        if not objects:
            raise DataError(f"{uri}: no such object or prefix (or nothing under it)")
        return {"uri": str(uri), "files": {o["rel"]: {"etag": o["ETag"].strip('"'), "size": o["Size"]} for o in objects}}
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=token).repo_info(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision, files_metadata=False)
    except Exception as exc:
        raise _hf_error(exc, uri) from None
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    names = [s.rfilename[len(prefix):] for s in (info.siblings or []) if s.rfilename.startswith(prefix)]
    return {"uri": str(uri), "revision": info.sha, "files": {n: {} for n in names if _included(n, include)},
            "pinned": str(HfUri(uri.repo_id, uri.repo_type, info.sha, uri.path))}


def probe_write(uri: Uri, token: str | None = None) -> None:
    """Write and delete a small object under `uri`, so that an output that can't be written fails before training.
    Raises the storage error (ConfigError for access denied, TransientError, ...) or OSError for local paths."""
    import secrets as _secrets

    name = f".qlora-job-write-probe-{_secrets.token_hex(4)}"
    if isinstance(uri, LocalUri):
        created = [p for p in [uri.path, *uri.path.parents] if not p.exists()]
        uri.path.mkdir(parents=True, exist_ok=True)
        probe = uri.path / name
        probe.write_bytes(b"probe\n")
        probe.unlink()
        for p in created:  # leave nothing behind: a failed run must not look like it published something
            with contextlib.suppress(OSError):  # not empty: another process of this run wrote there meanwhile
                p.rmdir()
        return
    if isinstance(uri, S3Uri):
        from botocore.exceptions import BotoCoreError, ClientError

        key = uri.join(name).key
        try:
            client = _s3()
            client.put_object(Bucket=uri.bucket, Key=key, Body=b"probe\n")
            client.delete_object(Bucket=uri.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, uri) from None
        return
    from huggingface_hub import HfApi

    if not token:
        raise ConfigError(f"{uri}: writing to the Hugging Face Hub needs HF_TOKEN (a token with write access)")
    try:
        HfApi(token=token).whoami()  # a commit would be the only true probe; a valid token is what can be checked cheaply
    except Exception as exc:
        raise _hf_error(exc, uri) from None

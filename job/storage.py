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
    # Anything that starts like a URI (`scheme:`) is one: a mistyped `s3:/bucket` or `S3://bucket` must not become a
    # local folder named `s3:` that vanishes with the container while the run reports success.
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(/*)", text)
    if m or "://" in text:
        scheme, slashes = (m.group(1), m.group(2)) if m else (text.partition("://")[0], "//")
        known = scheme.lower() in ("s3", "hf")
        if known and (scheme != scheme.lower() or slashes != "//"):
            rest = text[m.end():] if m else text.partition("://")[2]
            hint = f"did you mean {scheme.lower()}://{rest}?"
        else:
            hint = "use s3:// (also for S3-compatible stores), hf://, or a local path (./name for one with a colon)"
        raise ValueError(f"{text!r}: {'malformed' if known else 'unsupported'} scheme {scheme + ':' + slashes!r}; {hint}")
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

#: Files a loader picks up from a folder (PEFT, transformers, tokenizers) and the model card. When a run's artifact is
#: published to the root of its Hub output, those an earlier run left at that root are deleted in the same commit, so
#: the root never mixes an adapter with a merged model or an older tokenizer; anything else there (.gitattributes, a
#: LICENSE) stays.
HF_ARTIFACT_FILES = ["adapter_config.json", "adapter_model.safetensors", "*.safetensors", "*.safetensors.index.json",
                     "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "added_tokens.json", "chat_template*", "prompt_format.json", "vocab*", "merges.txt", "*.model",
                     "*.tiktoken", "README.md"]


def _hf_error(exc: Exception, uri: HfUri, *, writing: bool = False) -> JobError:
    """A huggingface_hub exception as the job's error. `writing`: the URI is an output. Messages name the URI and
    never quote the exception, whose text can hold request URLs and headers."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        BadRequestError,
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    # Offline mode: retrying can't help (exit 75 would retry forever); the cache or the variable has to change.
    if constants.is_offline_mode():
        if isinstance(exc, (LocalEntryNotFoundError, RevisionResolutionError)) and not writing:
            return DataError(f"{uri}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), or only partly, "
                             "and offline mode is on (HF_HUB_OFFLINE=1): download it once without HF_HUB_OFFLINE")
        if writing or isinstance(exc, OfflineModeIsEnabled):
            return ConfigError(f"{uri}: the Hub can't be reached: offline mode is on (HF_HUB_OFFLINE=1)")
    if writing:
        owner = uri.repo_id.split("/")[0]
        if isinstance(exc, RevisionNotFoundError):
            return ConfigError(f"{uri}: branch {uri.revision!r} not found (outputs are committed to a branch)")
        if status == 401 or isinstance(exc, RepositoryNotFoundError):
            return ConfigError(f"{uri}: the Hub refused HF_TOKEN ({status}); set HF_TOKEN to a token with write access "
                               f"to {owner}")
        if status == 403:
            return ConfigError(f"{uri}: HF_TOKEN has no write access to {uri.repo_id} (403); use a token with write "
                               f"permission for {owner}")
        if isinstance(exc, (BadRequestError, ValueError)) or (status and status < 500 and status != 429):
            # The Hub rejected what the job sent: a bug to report, not a failure that a retry fixes.
            return JobError(f"{uri}: the Hub rejected the upload ({status or type(exc).__name__})")
        return TransientError(f"{uri}: Hugging Face Hub upload failed: {type(exc).__name__}")
    if isinstance(exc, GatedRepoError):
        return ConfigError(f"{uri}: gated repository; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return DataError(f"{uri}: repository not found (or private: set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return DataError(f"{uri}: revision {uri.revision!r} not found")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return DataError(f"{uri}: file not found in the repository")
    if status in (401, 403):
        return ConfigError(f"{uri}: access denied ({status}); check HF_TOKEN")
    # Connection errors, 5xx, a cache miss while the Hub was unreachable: running again may work. The cause's type
    # only (RevisionResolutionError wraps it): its text can hold request URLs and headers.
    cause = exc.__cause__ if isinstance(exc, RevisionResolutionError) and exc.__cause__ is not None else exc
    if status is None and isinstance(cause, (OSError, httpx2.TransportError)):
        return TransientError(f"{uri}: the Hub at {constants.ENDPOINT} can't be reached ({type(cause).__name__}): check "
                              "the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT; or set HF_HUB_OFFLINE=1 to use a filled "
                              "HF_HOME cache")
    what = f"answered {status}" if status else f"request failed ({type(cause).__name__})"
    return TransientError(f"{uri}: the Hugging Face Hub at {constants.ENDPOINT} {what}; running again may work")


def _hf_pull(uri: HfUri, dest: Path, include: list[str] | None, token: str | None) -> tuple[Path, dict]:
    from huggingface_hub import HfApi, snapshot_download

    patterns = [f"{uri.path}/{p}" if uri.path else p for p in include] if include else None
    if uri.path and not include:
        patterns = [uri.path, f"{uri.path}/*"]
    try:
        # One resolution, so that every file comes from the same commit. It also records the branch or tag -> commit
        # mapping in HF_HOME's cache, where an offline run (HF_HUB_OFFLINE=1) finds it again.
        revision = HfApi(token=token).resolve_revision(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
        root = Path(snapshot_download(uri.repo_id, repo_type=uri.repo_type, revision=revision, allow_patterns=patterns,
                                      token=token))
    except Exception as exc:  # huggingface_hub raises many types; all are mapped to a user-facing error
        raise _hf_error(exc, uri) from None
    sha = revision.resolved
    path = root / uri.path if uri.path else root
    if not path.exists():
        raise DataError(f"{uri}: {uri.path!r} not found in the repository at {sha}")
    return path, {"uri": str(uri), "revision": sha}


def _hf_join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _hf_adds(src: Path, path_in_repo: str) -> list:
    from huggingface_hub import CommitOperationAdd

    if src.is_file():
        return [CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(src))]
    return [CommitOperationAdd(path_in_repo=_hf_join(path_in_repo, p.relative_to(src).as_posix()), path_or_fileobj=str(p))
            for p in sorted(src.rglob("*")) if p.is_file()]


def _hf_commit(api, uri: HfUri, operations: list, message: str) -> str:
    # create_commit, not upload_folder: with hf_xet installed, upload_folder splits a large folder into several
    # commits, and one commit is what makes an upload all-or-nothing.
    return api.create_commit(uri.repo_id, operations, commit_message=message, repo_type=uri.repo_type,
                             revision=uri.revision).oid


def _hf_prepare(uri: HfUri, token: str | None, private: bool) -> None:
    from huggingface_hub import HfApi, get_token

    if not (token or get_token()):
        raise ConfigError(f"{uri}: writing to the Hub needs a token with write access: set HF_TOKEN")
    api = HfApi(token=token)
    try:
        try:
            info = api.repo_info(uri.repo_id, repo_type=uri.repo_type)
        except Exception as exc:
            if type(exc).__name__ != "RepositoryNotFoundError":
                raise
            api.create_repo(uri.repo_id, repo_type=uri.repo_type, private=private, exist_ok=True)
            log.info("created the %s Hub repository %s", "private" if private else "public", uri.repo_id)
        else:
            if info.private is not None and info.private != private:
                log.warning("%s exists and is %s; JOB_HUB_PRIVATE applies only to a repository the job creates",
                            uri.repo_id, "private" if info.private else "public")
        if uri.revision:
            api.create_branch(uri.repo_id, branch=uri.revision, repo_type=uri.repo_type, exist_ok=True)
        api.auth_check(uri.repo_id, repo_type=uri.repo_type, write=True)
    except Exception as exc:
        raise _hf_error(exc, uri, writing=True) from None


def _hf_push(src: Path, uri: HfUri, token: str | None, message: str | None) -> None:
    from huggingface_hub import HfApi

    try:
        _hf_commit(HfApi(token=token), uri, _hf_adds(src, uri.path), message or f"qlora-job: upload {uri.path or src.name}")
    except Exception as exc:
        raise _hf_error(exc, uri, writing=True) from None


def publish_hub(local: Path, marker: Path, uri: HfUri, token: str | None, *, message: str, latest: str | None = None) -> str:
    """A run's outputs as one commit: the files of `local` under `uri`, and `marker` as `uri/_SUCCESS`, which thus
    appears in the same instant as everything it vouches for. With `latest` (a folder of `local`, "adapter" or
    "merged"), that folder's files also replace the artifact at the root of the output (the parent of `uri`), so that
    the repository loads by its id, as `push_to_hub` would leave it. The commit is tagged with the run id (the last
    part of `uri`): `revision=RUN_ID` loads that run's root. Returns the commit sha."""
    from huggingface_hub import CommitOperationDelete, HfApi

    api = HfApi(token=token)
    run_id = PurePosixPath(uri.path).name
    root = PurePosixPath(uri.path).parent.as_posix().strip(".")
    try:
        operations = _hf_adds(local, uri.path) + _hf_adds(marker, _hf_join(uri.path, "_SUCCESS"))
        if latest:
            new = _hf_adds(local / latest, root)
            names = {op.path_in_repo for op in new}
            prefix = root + "/" if root else ""
            stale = [f for f in api.list_repo_files(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
                     if f.startswith(prefix) and "/" not in f[len(prefix) :] and f not in names
                     and any(fnmatch.fnmatch(f[len(prefix) :], p) for p in HF_ARTIFACT_FILES)]
            operations += new + [CommitOperationDelete(path_in_repo=f) for f in stale]
        sha = _hf_commit(api, uri, operations, message)
    except Exception as exc:
        raise _hf_error(exc, uri, writing=True) from None
    try:
        api.create_tag(uri.repo_id, tag=run_id, revision=sha, tag_message=message, repo_type=uri.repo_type, exist_ok=True)
    except Exception as exc:  # the outputs are complete without it; only the revision shortcut is missing
        log.warning("could not tag %s at %s as %r: %s", uri.repo_id, sha[:12], run_id, type(exc).__name__)
    log.info("committed run %s to %s at %s", run_id, uri.repo_id, sha)
    return sha


def _hf_exists(uri: HfUri, token: str | None) -> bool:
    from huggingface_hub import HfApi

    try:  # a missing repository or branch is "no" (file_exists says so itself)
        return HfApi(token=token).file_exists(uri.repo_id, uri.path, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:
        raise _hf_error(exc, uri, writing=True) from None


def _hf_list(uri: HfUri, token: str | None) -> list[str]:
    from huggingface_hub import HfApi

    try:
        files = HfApi(token=token).list_repo_files(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision)
    except Exception as exc:
        if type(exc).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            return []
        raise _hf_error(exc, uri, writing=True) from None
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    return sorted(f[len(prefix) :] for f in files if f.startswith(prefix))


def _hf_delete(uri: HfUri, token: str | None) -> None:
    from huggingface_hub import HfApi

    if _hf_list(uri, token):  # deleting what isn't there is an error on the Hub, and would be an empty commit
        HfApi(token=token).delete_folder(uri.path, repo_id=uri.repo_id, repo_type=uri.repo_type, revision=uri.revision,
                                         commit_message=f"qlora-job: delete {uri.path}")


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


def prepare_output(uri: Uri, token: str | None = None, *, private: bool = True) -> None:
    """Before anything is downloaded: make sure the run can write its outputs. For hf:// this creates the repository
    if it is missing (private unless `private` is False), and its branch if the URI names one, then checks the
    token's write access, so that a missing or read-only HF_TOKEN fails the run before training, not after it.
    S3 and local outputs are not checked here (their first write reports the same errors)."""
    if isinstance(uri, HfUri):
        _hf_prepare(uri, token, private)


def push(src: Path, uri: Uri, token: str | None = None, *, message: str | None = None) -> None:
    """Upload a file or a directory tree to `uri` (a key or prefix); overwrites what is there. On the Hub it is one
    commit, with `message`."""
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
        _hf_push(src, uri, token, message)


def exists(uri: Uri, token: str | None = None) -> bool:
    """Whether a single object/file exists."""
    if isinstance(uri, LocalUri):
        return uri.path.exists()
    if isinstance(uri, S3Uri):
        return _s3_object(uri, "head_object") is not None
    return _hf_exists(uri, token)


def _s3_object(uri: S3Uri, method: str):
    """The S3 client's `method` (head_object, get_object) on the object, or None when it does not exist (404); any
    other failure as the job's storage error naming the URI."""
    from botocore.exceptions import ClientError

    try:
        return getattr(_s3(), method)(Bucket=uri.bucket, Key=uri.key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise _s3_error(exc, uri) from None
    except _s3_errors() as exc:
        raise _s3_error(exc, uri) from None


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
    return _hf_list(uri, token)


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
            _hf_delete(uri, token)
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
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    try:
        # As _hf_pull resolves it (through HF_HOME's cache when offline), so that the download gets this very commit.
        sha = api.resolve_revision(uri.repo_id, repo_type=uri.repo_type, revision=uri.revision).resolved
        names = None if constants.HF_HUB_OFFLINE else api.list_repo_files(uri.repo_id, repo_type=uri.repo_type, revision=sha)
    except Exception as exc:
        raise _hf_error(exc, uri) from None
    prefix = uri.path.rstrip("/") + "/" if uri.path else ""
    files = None if names is None else {n[len(prefix):]: {} for n in names if n.startswith(prefix) and _included(n[len(prefix):], include)}
    return {"uri": str(uri), "revision": sha, "files": files, "pinned": str(HfUri(uri.repo_id, uri.repo_type, sha, uri.path))}


def probe_write(uri: Uri, token: str | None = None, *, private: bool = True, dry: bool = False) -> None:
    """Before anything is downloaded: make sure the run can write its outputs, so that an output that can't be written
    fails before training. Local and S3: write and delete a small object under `uri`. Hub: create the repository if
    missing (private unless `private` is False) and its branch, and check the token's write access (`dry`, for
    --check: create nothing, check what can be checked). Raises the storage error (ConfigError for access denied,
    TransientError, ...) or OSError for local paths."""
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
    if not dry:  # the repository (and branch) the run will commit to, created now, and write access checked
        _hf_prepare(uri, token, private)
        return
    from huggingface_hub import HfApi, get_token

    if not (token or get_token()):
        raise ConfigError(f"{uri}: writing to the Hub needs a token with write access: set HF_TOKEN")
    api = HfApi(token=token)
    try:
        try:
            api.repo_info(uri.repo_id, repo_type=uri.repo_type)
        except Exception as exc:
            if type(exc).__name__ != "RepositoryNotFoundError":
                raise
            api.whoami()  # --check creates nothing: a repository that doesn't exist yet needs a valid token
        else:
            api.auth_check(uri.repo_id, repo_type=uri.repo_type, write=True)
    except Exception as exc:
        raise _hf_error(exc, uri, writing=True) from None


# ------------------------------------------------------------------------------------------- conditional writes (S3)
# The run lock's primitives (job/runlock.py). S3 has compared-and-set writes since 2024 (If-None-Match: * to create,
# If-Match: <etag> to replace); a store that ignores the headers makes the lock advisory only (docs/notes/a2.md).


def s3_create_or_replace(uri: S3Uri, body: bytes, *, etag: str | None = None) -> str | None:
    """Write `body` at `uri` only if nothing is there (`etag` None) or what is there still has `etag`; returns the new
    etag, or None when the condition failed (someone else wrote first)."""
    from botocore.exceptions import ClientError

    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        return _s3().put_object(Bucket=uri.bucket, Key=uri.key, Body=body, **condition)["ETag"]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
            return None
        raise _s3_error(exc, uri) from None
    except _s3_errors() as exc:
        raise _s3_error(exc, uri) from None


def s3_read_with_age(uri: S3Uri) -> tuple[bytes, str, float] | None:
    """(body, etag, seconds since it was last written, by the server's own clock) of an object, or None if absent."""
    from email.utils import parsedate_to_datetime

    got = _s3_object(uri, "get_object")
    if got is None:
        return None
    date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else None
    age = (now - got["LastModified"]).total_seconds() if now else 0.0
    return got["Body"].read(), got["ETag"], age


def s3_delete_object(uri: S3Uri) -> None:
    try:
        _s3().delete_object(Bucket=uri.bucket, Key=uri.key)
    except _s3_errors() as exc:
        raise _s3_error(exc, uri) from None

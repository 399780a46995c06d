"""A minimal fake Hugging Face Hub on 127.0.0.1 for the job's `hf://` paths (point HF_ENDPOINT at `hub.url`).

It speaks what huggingface_hub 2.4's HfApi, `snapshot_download` and the upload path of `create_commit` send, for model
and dataset repos kept in memory (a commit is a full snapshot: {path: bytes}).

Reading:
  GET  /api/{models|datasets}/{org}/{name}[/revision/{rev}]          repo_info: {"id", "sha", "private", "siblings"}
  GET  /api/{models|datasets}/{org}/{name}/tree/{rev}[/{path}]       file listing (one page, always recursive)
  HEAD /[datasets/]{org}/{name}/resolve/{rev}/{file}                 file metadata (hf_hub_download)
  GET  /[datasets/]{org}/{name}/resolve/{rev}/{file}                 the file itself
Writing (the order `create_repo` + `upload_folder`/`create_commit` + `create_tag` follow):
  POST /api/repos/create                                             {"name", "organization", "visibility", "type"}
  GET  /api/{kind}/{org}/{name}/auth-check[/write]                   auth_check(write=...)
  POST /api/{kind}/{org}/{name}/branch/{branch}                      create_branch (from main)
  POST /api/validate-yaml                                            README.md metadata (base_model must be a repo id)
  POST /api/{kind}/{org}/{name}/preupload/{rev}                      upload mode per file: "lfs" or "regular"
  POST /[datasets/]{org}/{name}.git/info/lfs/objects/batch           LFS batch API (basic transfer): upload + verify hrefs
  PUT  /lfs-objects/{ticket}/{oid}                                   the LFS upload itself (a "presigned" URL: no auth)
  POST /api/{kind}/{org}/{name}/lfs-verify                           LFS verify
  POST /api/{kind}/{org}/{name}/commit/{rev}                         ndjson: header, file, lfsFile, deletedFile/Folder
  POST /api/{kind}/{org}/{name}/tag/{rev}                            create_tag {"tag", "message"}

Anything else (huggingface_hub's GET /api/agent-harnesses, TRL's HEAD /api/telemetry/...) gets a plain 404, which
those callers ignore. Files are served as plain git blobs (`ETag` = git blob sha1, no `X-Linked-*` or `X-Xet-*`
headers), so the client downloads with a plain GET from this server. Uploads use LFS, not Xet: the client must run with
HF_HUB_DISABLE_XET=1 (with hf_xet installed, huggingface_hub would otherwise upload large files to a Xet CAS server).
A file goes through LFS when its name matches `LFS_PATTERNS`, it is `lfs_threshold` bytes or larger, or its sample
holds a NUL byte, as the real Hub decides from .gitattributes, size and content; every other file goes inline in the
commit as base64.

Repos added with `add_repo` have a branch `main` and a tag `v1` on an older commit; both commits hold the same files.
A repo created through the API starts with one commit holding `.gitattributes`, as on the Hub. A revision is a
branch/tag name or a full commit sha.

Tokens: `token` may read and write everything; `read_token` (optional) may read everything and write nothing.
Errors are the ones the real Hub returns, with the headers `hf_raise_for_status` turns into exceptions:
  - a token the Hub doesn't know, on any request:      401, X-Error-Message "Invalid credentials in Authorization header"
    (huggingface_hub raises a plain HfHubHTTPError(401));
  - no token, for a private or unknown repo:           401, X-Error-Code RepoNotFound (RepositoryNotFoundError);
  - no token, for any write:                           401 "You must be authenticated to perform this action"
  - a valid token, for an unknown repo:                404, X-Error-Code RepoNotFound;
  - a read-only token, for any write:                  403 "You don't have the rights to ..." (HfHubHTTPError(403));
  - unknown revision / file:                           404, X-Error-Code RevisionNotFound / EntryNotFound.

Every request is recorded in `hub.requests` (method, path, Authorization header) for the tests to inspect; every
commit in `repo.log`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

#: What the Hub accepts as `base_model_relation` (huggingface.co/docs/hub/model-cards).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def _model_index_errors(index) -> list[str]:
    """The Hub's shape of `model-index` eval results: [{name, results: [{task: {type}, dataset: {type, name},
    metrics: [{type, value}]}]}]."""
    if index is None:
        return []
    try:
        assert isinstance(index, list) and index
        for entry in index:
            assert isinstance(entry["name"], str) and entry["results"]
            for result in entry["results"]:
                assert isinstance(result["task"]["type"], str)
                assert isinstance(result["dataset"]["type"], str) and isinstance(result["dataset"]["name"], str)
                for metric in result["metrics"]:
                    assert isinstance(metric["type"], str) and "value" in metric
    except (AssertionError, KeyError, TypeError) as exc:
        return [f"malformed ({type(exc).__name__}: {exc})"]
    return []

KINDS = {"models": "model", "datasets": "dataset"}
PREFIX = {"model": "", "dataset": "datasets/"}
#: What the Hub's default .gitattributes sends to LFS (a subset).
LFS_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.parquet", "*.arrow", "*.zip", "*.gz"]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]
    lfs: set[str]  # paths stored through LFS


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> message
    log: list[Commit] = field(default_factory=list)  # oldest first

    @property
    def sha(self) -> str:
        """The commit `main` points to."""
        return self.refs["main"]

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if any(c.sha == revision for c in self.log) else None)

    def commit(self, sha: str) -> Commit:
        return next(c for c in self.log if c.sha == sha)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.commit(self.resolve(revision)).files

    def add_commit(self, message: str, files: dict[str, bytes], lfs: set[str], branch: str | None = "main") -> Commit:
        sha = _sha1(f"{self.repo_type}/{self.repo_id}#{len(self.log)}:{message}")
        commit = Commit(sha, message, dict(files), set(lfs))
        self.log.append(commit)
        if branch:
            self.refs[branch] = sha
        return commit


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class _Denied(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """`with FakeHub(token) as hub: hub.add_repo(...)`; `hub.url` is the value for HF_ENDPOINT."""

    def __init__(self, token: str, *, read_token: str | None = None, lfs_threshold: int = 10 * 2**20):
        self.token, self.read_token, self.lfs_threshold = token, read_token, lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.metadata: list[dict] = []  # every README header validated (POST /api/validate-yaml)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, once uploaded
        self._ticket = secrets.token_hex(8)  # stands in for the signature of a presigned upload URL
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_POST(self):
                hub._handle(self, body=True)

            def do_PUT(self):
                hub._handle(self, body=True)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_type: str, repo_id: str, folder: Path, *, private: bool = False) -> Repo:
        """A repo holding the files of `folder`, at `main` and (an older commit, same files) at tag `v1`."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        repo = Repo(repo_type, repo_id, private)
        repo.refs["v1"] = repo.add_commit("v1", files, set(), branch=None).sha
        repo.tags["v1"] = "v1"
        repo.add_commit("main", files, set())
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def authorizations(self) -> set[str | None]:
        return {r.authorization for r in self.requests}

    # ------------------------------------------------------------------------------------------------ routing

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        auth = h.headers.get("Authorization")
        path = urlsplit(h.path).path
        self.requests.append(Request(h.command, path, auth))
        data = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command in ("POST", "PUT") else b""
        parts = [unquote(p) for p in path.strip("/").split("/")]  # split before unquoting: revisions may hold "%2F"
        try:
            with self._lock:
                self._route(h, h.command, parts, auth, data, body)
        except _Denied as d:
            self._error(h, d.status, d.message, code=d.code, body=body)

    def _route(self, h, method: str, parts: list[str], auth: str | None, data: bytes, body: bool) -> None:
        if method == "PUT" and parts[:1] == ["lfs-objects"]:  # a presigned URL: the ticket is the credential
            return self._lfs_put(h, parts[1:], data)
        if auth is not None and auth not in (f"Bearer {self.token}", f"Bearer {self.read_token}"):
            return self._error(h, 401, "Invalid credentials in Authorization header", body=body)
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(h, auth, json.loads(data))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(h, json.loads(data))
        if method == "POST" and len(parts) >= 6 and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            kind = "dataset" if parts[0] == "datasets" else "model"
            names = parts[1:3] if kind == "dataset" else parts[0:2]
            repo = self._repo_for(kind, f"{names[0]}/{names[1].removesuffix('.git')}", auth, write=True)
            return self._lfs_batch(h, repo, json.loads(data))
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in KINDS:
            repo_type, repo_id, rest = KINDS[parts[1]], "/".join(parts[2:4]), parts[4:]
        elif len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            repo_type, repo_id, rest = "dataset", "/".join(parts[1:3]), parts[3:]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_type, repo_id, rest = "model", "/".join(parts[0:2]), parts[2:]
        else:
            return self._error(h, 404, "Not found", body=body)

        if method == "POST":
            repo = self._repo_for(repo_type, repo_id, auth, write=True)
            if rest[:1] == ["preupload"]:
                return self._preupload(h, repo, "/".join(rest[1:]), json.loads(data))
            if rest[:1] == ["commit"]:
                return self._commit(h, repo, "/".join(rest[1:]), data)
            if rest[:1] == ["tag"]:
                return self._tag(h, repo, "/".join(rest[1:]), json.loads(data or b"{}"))
            if rest[:1] == ["branch"]:
                return self._branch(h, repo, "/".join(rest[1:]))
            if rest == ["lfs-verify"]:
                return self._lfs_verify(h, json.loads(data))
            return self._error(h, 404, "Not found")

        if rest[:1] == ["auth-check"]:
            repo = self._repo_for(repo_type, repo_id, auth, write=rest[1:] == ["write"])
            return self._json(h, {"ok": True}, body=body)
        repo = self._repo_for(repo_type, repo_id, auth, write=False)
        if not rest:  # repo_info at main
            return self._info(h, repo, repo.sha, body)
        if len(rest) < 2 or rest[0] not in ("revision", "tree", "resolve"):
            return self._error(h, 404, "Not found", body=body)
        sha = repo.resolve(rest[1])
        if sha is None:
            return self._error(h, 404, f"Invalid rev id: {rest[1]}", code="RevisionNotFound", body=body)
        if rest[0] == "revision":
            return self._info(h, repo, sha, body)
        if rest[0] == "tree":
            return self._tree(h, repo, sha, "/".join(rest[2:]), body)
        return self._file(h, repo, sha, "/".join(rest[2:]), body)

    def _can_write(self, auth: str | None) -> None:
        if auth is None:
            raise _Denied(401, "You must be authenticated to perform this action")
        if auth != f"Bearer {self.token}":
            raise _Denied(403, "You don't have the rights to write to this repository: this token has read access only")

    def _repo_for(self, repo_type: str, repo_id: str, auth: str | None, *, write: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and auth is None):
            # The Hub does not tell a private repo from a missing one; anonymous callers get 401, others 404.
            raise _Denied(401 if auth is None else 404, "Repository not found", code="RepoNotFound")
        if write:
            self._can_write(auth)
        return repo

    # ------------------------------------------------------------------------------------------------ reading

    def _info(self, h, repo: Repo, sha: str, body: bool) -> None:
        self._json(h, {"id": repo.repo_id, "sha": sha, "private": repo.private,
                       "siblings": [{"rfilename": name} for name in repo.commit(sha).files]}, body=body)

    def _tree(self, h, repo: Repo, sha: str, prefix: str, body: bool) -> None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                   for name, data in sorted(repo.commit(sha).files.items()) if name.startswith(prefix)]
        self._json(h, entries, body=body)

    def _file(self, h, repo: Repo, sha: str, name: str, body: bool) -> None:
        data = repo.commit(sha).files.get(name)
        if data is None:
            return self._error(h, 404, "Entry not found", code="EntryNotFound", body=body, headers={"X-Repo-Commit": sha})
        self._send(h, 200, data, "application/octet-stream", body,
                   {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'})

    # ------------------------------------------------------------------------------------------------ writing

    def _create_repo(self, h, auth: str | None, payload: dict) -> None:
        self._can_write(auth)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}"
        if (repo_type, repo_id) in self.repos:
            return self._error(h, 409, f"You already created this {repo_type} repo")
        repo = Repo(repo_type, repo_id, private=payload.get("visibility", "public") != "public")
        repo.add_commit("initial commit", {".gitattributes": GITATTRIBUTES}, set())
        self.repos[(repo_type, repo_id)] = repo
        self._json(h, {"url": f"{self.url}/{PREFIX[repo_type]}{repo_id}", "name": repo_id})

    def _validate_yaml(self, h, payload: dict) -> None:
        """The Hub's checks of a README's metadata that concern the job's cards (hub-docs: model-cards.md); every
        header validated is kept in `self.metadata`."""
        text = payload.get("content", "")
        errors = []
        if text.startswith("---\n"):
            meta = yaml.safe_load(text[4:].split("\n---", 1)[0]) or {}
            base = meta.get("base_model")
            for value in base if isinstance(base, list) else [base] if base else []:
                if not isinstance(value, str) or not fnmatch.fnmatch(value, "?*/?*") or value.count("/") != 1 or ":" in value:
                    errors.append({"message": f'"base_model" must be a Hub model id, got {value!r}'})
            relation = meta.get("base_model_relation")
            if relation is not None and (relation not in BASE_MODEL_RELATIONS or not base):
                errors.append({"message": f'"base_model_relation" must be one of {BASE_MODEL_RELATIONS} beside a '
                                          f'"base_model", got {relation!r}'})
            for key in ("datasets", "tags"):
                value = meta.get(key)
                if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    errors.append({"message": f'"{key}" must be a list of strings, got {value!r}'})
            for value in meta.get("datasets") or []:
                if value.count("/") > 1 or ":" in value:
                    errors.append({"message": f'"datasets" must hold Hub dataset ids, got {value!r}'})
            errors += [{"message": f'"model-index": {e}'} for e in _model_index_errors(meta.get("model-index"))]
            self.metadata.append(meta)
        if errors:
            return self._json(h, {"errors": errors, "warnings": []}, status=400)
        self._json(h, {"errors": [], "warnings": []})

    def _branch(self, h, repo: Repo, branch: str) -> None:
        if branch in repo.refs:
            return self._error(h, 409, f"Reference already exists: {branch}")
        repo.refs[branch] = repo.sha
        self._json(h, {})

    def _preupload(self, h, repo: Repo, revision: str, payload: dict) -> None:
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(h, 404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        current = repo.commit(sha)
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                   or f["size"] >= self.lfs_threshold or b"\0" in sample)
            old = current.files.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if f["path"] in current.lfs else git_blob_sha1(old)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(h, {"files": files, "commitOid": sha})

    def _lfs_batch(self, h, repo: Repo, payload: dict) -> None:
        assert payload["operation"] == "upload" and "basic" in payload["transfers"], payload
        objects = []
        for o in payload["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-objects/{self._ticket}/{o['oid']}"},
                    "verify": {"href": f"{self.url}/api/{repo.repo_type}s/{repo.repo_id}/lfs-verify"},
                }
            objects.append(entry)
        self._send(h, 200, json.dumps({"transfer": "basic", "objects": objects}).encode(), "application/vnd.git-lfs+json",
                   True, {})

    def _lfs_put(self, h, parts: list[str], data: bytes) -> None:
        if len(parts) != 2 or parts[0] != self._ticket:
            return self._error(h, 403, "Request has expired or its signature does not match")
        if hashlib.sha256(data).hexdigest() != parts[1]:
            return self._error(h, 400, "The uploaded content does not match its sha256")
        self.lfs_objects[parts[1]] = data
        self._send(h, 200, b"", "text/plain", True, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, h, payload: dict) -> None:
        data = self.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            return self._error(h, 404, f"LFS object {payload['oid']} was not uploaded")
        self._json(h, {})

    def _commit(self, h, repo: Repo, revision: str, data: bytes) -> None:
        if revision not in repo.refs or revision in repo.tags:
            return self._error(h, 404, f"Invalid rev id: {revision}: not a branch", code="RevisionNotFound")
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = repo.commit(repo.refs[revision])
        files, lfs = dict(parent.files), set(parent.lfs)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None:
                    return self._error(h, 422, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                files[value["path"]], _ = content, lfs.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]
                if not gone:
                    return self._error(h, 404, "A file with this name doesn't exist", code="EntryNotFound")
                for p in gone:
                    files.pop(p)
                    lfs.discard(p)
        commit = repo.add_commit(header["summary"], files, lfs, branch=revision)
        self._json(h, {"commitUrl": f"{self.url}/{PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}",
                       "commitOid": commit.sha, "success": True})

    def _tag(self, h, repo: Repo, revision: str, payload: dict) -> None:
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(h, 404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        if payload["tag"] in repo.refs:
            return self._error(h, 409, f"Tag {payload['tag']} already exists")
        repo.refs[payload["tag"]] = sha
        repo.tags[payload["tag"]] = payload.get("message", "")
        self._json(h, {})

    # ------------------------------------------------------------------------------------------------ responses

    def _json(self, h, obj, status: int = 200, body: bool = True, headers: dict | None = None) -> None:
        self._send(h, status, json.dumps(obj).encode(), "application/json", body, headers or {})

    def _error(self, h, status: int, message: str, code: str | None = None, body: bool = True, headers: dict | None = None):
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._json(h, {"error": message}, status=status, body=body, headers=headers)

    @staticmethod
    def _send(h, status: int, data: bytes, content_type: str, body: bool, headers: dict) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

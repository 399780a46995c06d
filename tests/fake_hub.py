"""A minimal fake Hugging Face Hub on 127.0.0.1 for the job's `hf://` read path (point HF_ENDPOINT at `hub.url`).

It serves only what `HfApi(token).repo_info(...)` and `snapshot_download(...)` of huggingface_hub 2.x call, for model
and dataset repos, each backed by a local folder:

  GET  /api/{models|datasets}/{org}/{name}[/revision/{rev}]          repo_info: {"id", "sha", "private", "siblings"}
  GET  /api/{models|datasets}/{org}/{name}/tree/{rev}[/{path}]       snapshot_download's file listing (one page)
  HEAD /[datasets/]{org}/{name}/resolve/{rev}/{file}                 file metadata (hf_hub_download)
  GET  /[datasets/]{org}/{name}/resolve/{rev}/{file}                 the file itself

Anything else (huggingface_hub's GET /api/agent-harnesses, TRL's HEAD /api/telemetry/...) gets a plain 404, which
those callers ignore.

Every file is served as a plain git blob: `ETag` is its git blob sha1, `Content-Length` its size, `X-Repo-Commit` the
commit. No `X-Linked-*` headers (no LFS redirect to a CDN) and no `X-Xet-*` headers (no Xet storage), so the client
downloads with a plain GET from this server.

Each repo has a branch `main` and a tag `v1` on an older commit; both commits hold the same files. A revision is a
branch/tag name or a full commit sha.

Errors are the ones the real Hub returns, with the headers `hf_raise_for_status` turns into exceptions:
  - a token other than the known one, on any request:  401, X-Error-Message "Invalid credentials in Authorization header"
    (huggingface_hub raises a plain HfHubHTTPError(401));
  - no token, for a private or unknown repo:           401, X-Error-Code RepoNotFound (RepositoryNotFoundError);
  - a valid token, for an unknown repo:                404, X-Error-Code RepoNotFound;
  - unknown revision / file:                           404, X-Error-Code RevisionNotFound / EntryNotFound.

Every request is recorded in `hub.requests` (method, path, Authorization header) for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

KINDS = {"models": "model", "datasets": "dataset"}


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    folder: Path
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag name -> commit sha

    @property
    def sha(self) -> str:
        """The commit `main` points to."""
        return self.refs["main"]

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.refs.values() else None)

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """`with FakeHub(token) as hub: hub.add_repo(...)`; `hub.url` is the value for HF_ENDPOINT."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

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
        seed = f"{repo_type}/{repo_id}"
        repo = Repo(repo_type, repo_id, Path(folder), private, {"main": _sha1(seed + "@2"), "v1": _sha1(seed + "@1")})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def authorizations(self) -> set[str | None]:
        return {r.authorization for r in self.requests}

    # ------------------------------------------------------------------------------------------------ routing

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        auth = h.headers.get("Authorization")
        path = urlsplit(h.path).path
        self.requests.append(Request(h.command, path, auth))
        parts = [unquote(p) for p in path.strip("/").split("/")]  # split before unquoting: revisions may hold "%2F"

        if auth is not None and auth != f"Bearer {self.token}":
            return self._error(h, 401, "Invalid credentials in Authorization header", body=body)
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in KINDS:
            repo_type, repo_id, rest = KINDS[parts[1]], "/".join(parts[2:4]), parts[4:]
        elif len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            repo_type, repo_id, rest = "dataset", "/".join(parts[1:3]), parts[3:]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_type, repo_id, rest = "model", "/".join(parts[0:2]), parts[2:]
        else:
            return self._error(h, 404, "Not found", body=body)

        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and auth is None):
            # The Hub does not tell a private repo from a missing one; anonymous callers get 401, others 404.
            return self._error(h, 401 if auth is None else 404, "Repository not found", code="RepoNotFound", body=body)

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
            return self._tree(h, repo, "/".join(rest[2:]), body)
        return self._file(h, repo, sha, "/".join(rest[2:]), body)

    # ------------------------------------------------------------------------------------------------ endpoints

    def _info(self, h, repo: Repo, sha: str, body: bool) -> None:
        self._json(h, {"id": repo.repo_id, "sha": sha, "private": repo.private,
                       "siblings": [{"rfilename": name} for name in repo.files()]}, body=body)

    def _tree(self, h, repo: Repo, prefix: str, body: bool) -> None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": git_blob_sha1(p.read_bytes())}
                   for name, p in repo.files().items() if name.startswith(prefix)]
        self._json(h, entries, body=body)

    def _file(self, h, repo: Repo, sha: str, name: str, body: bool) -> None:
        p = repo.files().get(name)
        if p is None:
            return self._error(h, 404, "Entry not found", code="EntryNotFound", body=body, headers={"X-Repo-Commit": sha})
        data = p.read_bytes()
        self._send(h, 200, data, "application/octet-stream", body,
                   {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'})

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

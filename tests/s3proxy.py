"""A loopback HTTP proxy in front of the test S3 server (moto's), to inject what real storage does: outages, 5xx,
403. Requests pass through unchanged (the signed Host header included) unless a rule says otherwise.

    proxy = S3Proxy(s3_server_url)              # proxy.url goes into AWS_ENDPOINT_URL
    proxy.fail(500, method="PUT", times=2)      # the next two PUTs get 500 InternalError
    proxy.when("PUT", r"/checkpoint-2/", lambda: proxy.down(5))   # an outage starting at that request
    proxy.log                                   # [(seconds since start, method, path, status or "reset")]

An outage resets every connection (open ones and new ones) for its duration, as a stopped server would: the client
sees its connection refused or reset, which is what botocore retries.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}
CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


@dataclass
class _Rule:
    method: str | None
    pattern: re.Pattern | None
    times: int | None  # None: every matching request
    status: int | None = None  # respond with this error
    action: object = None  # or call this once, then handle the request
    nth: int = 1
    seen: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.pattern is None or bool(self.pattern.search(path)))


class S3Proxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.log: list[tuple[float, str, str, object]] = []
        self._rules: list[_Rule] = []
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._t0 = time.monotonic()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # ------------------------------------------------------------------------------------------------ controls

    def down(self, seconds: float) -> None:
        """Stop serving for `seconds`: open connections are reset, new ones are reset as they arrive."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            conns = list(self._conns)
        for c in conns:  # their threads hold them open: shut them down, the threads then close them
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_up(self) -> None:
        """Return once an outage started by `down` is over."""
        with self._lock:
            left = self._down_until - time.monotonic()
        if left > 0:
            time.sleep(left)

    def fail(self, status: int, *, method: str | None = None, path: str | None = None, times: int | None = 1) -> None:
        """Answer matching requests with `status` and S3's error body (`times` of them; None: all)."""
        self._rules.append(_Rule(method, re.compile(path) if path else None, times, status=status))

    def when(self, method: str | None, path: str | None, action, *, nth: int = 1) -> None:
        """Call `action()` once, when the `nth` matching request arrives (before it is handled)."""
        self._rules.append(_Rule(method, re.compile(path) if path else None, 1, action=action, nth=nth))

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[float, str, str, object]]:
        return [e for e in self.log if (method is None or e[1] == method) and (path is None or re.search(path, e[2]))]

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for c in list(self._conns):
            _reset(c)

    # ------------------------------------------------------------------------------------------------ serving

    def _is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._is_down():
                self._record("?", "?", "reset")
                _reset(conn)
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _record(self, method: str, path: str, outcome) -> None:
        with self._lock:
            self.log.append((round(time.monotonic() - self._t0, 3), method, path, outcome))

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:
            while True:
                line = rfile.readline(65537)
                if not line.strip():
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = []
                while (h := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers.append((k.strip(), v.strip()))
                names = {k.lower(): v for k, v in headers}
                path = target.split("?", 1)[0]
                rule = self._match(method, path)
                if rule is not None and rule.action is not None:
                    rule.action()
                if self._is_down():
                    self._record(method, path, "reset")
                    return _reset(conn)
                if rule is not None and rule.status is not None:
                    # Real S3 answers an `Expect: 100-continue` request before its body is sent; then the
                    # connection can't carry another request.
                    if names.get("expect", "").lower() != "100-continue":
                        _read_body(rfile, names)
                    self._record(method, path, rule.status)
                    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{CODES.get(rule.status, "Error")}</Code>'
                            f"<Message>injected by the test proxy</Message></Error>").encode()
                    head = (f"HTTP/1.1 {rule.status} {http.client.responses.get(rule.status, '')}\r\n"
                            f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                    conn.sendall(head.encode() + (b"" if method == "HEAD" else body))
                    return
                if names.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, names)
                if body is None:  # the client went away mid-request (killed): nothing reaches the server
                    self._record(method, path, "incomplete")
                    return
                status, reason, rheaders, rbody = self._forward(method, target, headers, body)
                if self._is_down():  # the outage began while upstream was answering
                    self._record(method, path, "reset")
                    return _reset(conn)
                self._record(method, path, status)
                out = [f"HTTP/1.1 {status} {reason}"]
                for k, v in rheaders:
                    if k.lower() not in HOP and k.lower() != "transfer-encoding" and not (k.lower() == "content-length" and method != "HEAD"):
                        out.append(f"{k}: {v}")
                if method != "HEAD":
                    out.append(f"Content-Length: {len(rbody)}")
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else rbody))
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _match(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.times is None or rule.times > 0) and rule.matches(method, path):
                    rule.seen += 1
                    if rule.seen < rule.nth:
                        continue
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def _forward(self, method, target, headers, body):
        up = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in HOP:
                    up.putheader(k, v)
            up.endheaders(body if body else None)
            resp = up.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            up.close()


def _read_body(rfile, names: dict) -> bytes | None:
    """The request body as sent (a chunked body stays chunked: it is passed on as it is); None if it was cut off."""
    if "chunked" in names.get("transfer-encoding", "").lower():
        raw = b""
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                return None
            raw += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (t := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    raw += t
                return raw + b"\r\n"
            chunk = rfile.read(size + 2)
            if len(chunk) < size + 2:
                return None
            raw += chunk
    n = int(names.get("content-length", "0") or 0)
    data = rfile.read(n) if n else b""
    return data if len(data) == n else None


def _reset(conn: socket.socket) -> None:
    """Close with RST, as a process that died or a stopped server does, not with an orderly FIN."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass

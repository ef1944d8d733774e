"""A local HTTP server on loopback that answers like a survey archive, for adapter tests.

Routes map a path (exact, or a prefix ending in ``/``) to a handler ``(Request) -> Reply``.
Failure injection, applied before the route:

- ``fail_fraction(f, prefix=..., status=503, seed=0)``: a fixed, reproducible ``f`` of the
  distinct requests under ``prefix`` always fail (retries cannot save them);
- ``fail_first(n, prefix=...)``: every distinct request fails its first ``n`` attempts, then works
  (exercises retry with backoff);
- ``truncate(prefix=...)``: bodies are cut in half while the ``Content-Length`` promises all of
  it (a dropped connection mid-download).

``server.requests`` records every request (method, path, query) so tests can count them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    headers: dict[str, str]

    @property
    def key(self) -> str:
        return self.method + " " + self.path + "?" + "&".join(f"{k}={v}" for k, v in sorted(self.query.items()))


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def html_error(status: int = 200, text: str = "Service temporarily unavailable") -> Reply:
    """An HTML page where a product was expected (archives do this with status 200)."""
    return Reply(status, f"<!DOCTYPE html><html><body><h1>{text}</h1></body></html>".encode(), "text/html")


Handler = Callable[[Request], Reply]


class ArchiveServer:
    def __init__(self):
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self._fail_fraction: list[tuple[str, float, int, int]] = []
        self._fail_first: list[tuple[str, int]] = []
        self._truncate: list[str] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class _H(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Request(self.command, parts.path, query, body, dict(self.headers))
                reply, truncate = server._dispatch(req)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                data = reply.body[: len(reply.body) // 2] if truncate else reply.body
                try:
                    self.wfile.write(data)
                    if truncate:
                        self.wfile.flush()
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def fail_fraction(self, fraction: float, *, prefix: str = "/", status: int = 503, seed: int = 0) -> None:
        self._fail_fraction.append((prefix, fraction, status, seed))

    def fail_first(self, n: int, *, prefix: str = "/") -> None:
        self._fail_first.append((prefix, n))

    def truncate(self, *, prefix: str = "/") -> None:
        self._truncate.append(prefix)

    def count(self, prefix: str = "/") -> int:
        return sum(r.path.startswith(prefix) for r in self.requests)

    def _dispatch(self, req: Request) -> tuple[Reply, bool]:
        with self._lock:
            self.requests.append(req)
            self._attempts[req.key] = attempt = self._attempts.get(req.key, 0) + 1
        for prefix, fraction, status, seed in self._fail_fraction:
            if req.path.startswith(prefix):
                h = int(hashlib.sha256(f"{seed}:{req.key}".encode()).hexdigest()[:8], 16) / 16**8
                if h < fraction:
                    return Reply(status, b"injected failure", "text/plain"), False
        for prefix, n in self._fail_first:
            if req.path.startswith(prefix) and attempt <= n:
                return Reply(503, b"try again", "text/plain", {"Retry-After": "0"}), False
        handler = self.routes.get(req.path)
        if handler is None:
            for path, h in sorted(self.routes.items(), key=lambda kv: -len(kv[0])):
                if path.endswith("/") and req.path.startswith(path):
                    handler = h
                    break
        if handler is None:
            return Reply(404, f"no route for {req.path}".encode(), "text/plain"), False
        try:
            reply = handler(req)
        except Exception as exc:  # noqa: BLE001 - a handler bug shows up as a 500, like a real server
            return Reply(500, f"handler error: {type(exc).__name__}: {exc}".encode(), "text/plain"), False
        return reply, any(req.path.startswith(p) for p in self._truncate)

    def __enter__(self) -> "ArchiveServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

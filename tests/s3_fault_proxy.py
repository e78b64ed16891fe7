"""A fault-injecting HTTP proxy for the S3 server of the tests, on 127.0.0.1.

    proxy = S3FaultProxy("http://127.0.0.1:5000", seed=1).start()
    storage = StorageSpec(endpoint_url=proxy.endpoint_url, ...)   # s3fs talks to the proxy
    proxy.set_faults(0.2, kinds=("500", "503", "drop"))          # a fifth of the requests fail
    proxy.outage(3.0)                                             # every request fails for 3 s
    proxy.counts["503"], proxy.injected                           # what was injected

Each request is forwarded to the upstream server unless a fault is drawn for it (seeded, so a run with
the same requests in the same order draws the same faults):

- ``500``: HTTP 500 with an S3 ``InternalError`` XML body;
- ``503``: HTTP 503 with an S3 ``SlowDown`` XML body (throttling);
- ``drop``: the connection is closed without any reply.

During an outage every request fails with the outage's kind. Faults apply to requests whose
``METHOD path`` matches ``match`` (a regular expression; all requests when None), so a test can fail the
reads of one bucket and leave the rest alone. ``delay(seconds, match)`` slows matching requests down
(to hold a job inside a phase long enough to kill it there). Thread-safe; switch anything at runtime.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("500", "503", "drop")

_ERROR_BODY = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}
#: headers that concern one hop, not the message (never copied between the two connections)
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def error_body(kind: str, path: str) -> bytes:
    """The S3 XML error document for a ``500`` or ``503`` fault."""
    code, message = _ERROR_BODY[kind]
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{path}</Resource><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>").encode()


class S3FaultProxy:
    """The proxy; ``start()`` serves it on a free port of 127.0.0.1 in background threads.

    Args:
        upstream: the real server, ``http://host:port``.
        seed: seeds the draw of which requests fail and how.
    """

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rate = 0.0
        self.kinds: tuple[str, ...] = FAULT_KINDS
        self.match: re.Pattern | None = None
        self._outage_until = 0.0
        self._outage_kind = "503"
        self._delay = 0.0
        self._delay_match: re.Pattern | None = None
        #: requests seen, forwarded, and faults injected by kind (``500``, ``503``, ``drop``) and ``outage``
        self.counts: Counter = Counter()
        #: every request seen, as "METHOD path" (for a test to wait for a phase of a job)
        self.seen: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------------

    def start(self) -> "S3FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_faults(self, rate: float, kinds: tuple[str, ...] = FAULT_KINDS, match: str | None = None) -> None:
        """Fail a fraction ``rate`` (0..1) of the matching requests, each with a kind drawn from ``kinds``."""
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        with self._lock:
            self.rate, self.kinds = rate, tuple(kinds)
            self.match = re.compile(match) if match else None

    def outage(self, seconds: float, kind: str = "503") -> None:
        """From now on, for ``seconds``, every matching request fails with ``kind``."""
        with self._lock:
            self._outage_until, self._outage_kind = time.monotonic() + seconds, kind

    def delay(self, seconds: float, match: str | None = None) -> None:
        """Hold each request matching ``match`` (every request when None) ``seconds`` before serving it."""
        with self._lock:
            self._delay, self._delay_match = seconds, re.compile(match) if match else None

    def clear(self) -> None:
        """No more faults, outages or delays (the counts stay)."""
        with self._lock:
            self.rate, self._outage_until, self._delay = 0.0, 0.0, 0.0

    @property
    def injected(self) -> int:
        """Faults injected so far, every kind and outages together."""
        return sum(self.counts[k] for k in (*FAULT_KINDS, "outage"))

    def requests_matching(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.seen if regex.search(line))

    # -- per request --------------------------------------------------------------------------------

    def _decide(self, line: str) -> tuple[str | None, float]:
        """(fault kind or None, seconds to hold the request) for one request."""
        with self._lock:
            self.counts["requests"] += 1
            self.seen.append(line)
            hold = self._delay if self._delay and (self._delay_match is None or self._delay_match.search(line)) else 0.0
            if self.match is not None and not self.match.search(line):
                return None, hold
            if time.monotonic() < self._outage_until:
                self.counts["outage"] += 1
                return self._outage_kind, hold
            if self.rate and self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.counts[kind] += 1
                return kind, hold
            return None, hold


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: S3FaultProxy

    def log_message(self, format, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()  # read it whatever happens, so a kept-alive connection stays in step
        kind, hold = self.owner._decide(f"{self.command} {self.path}")
        if hold:
            time.sleep(hold)
        if kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if kind in _ERROR_BODY:
            payload = error_body(kind, urlsplit(self.path).path)
            self.send_response(int(kind))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        owner = self.owner
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or "Content-Length" in self.headers or self.headers.get("Transfer-Encoding"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            length_sent = False
            for k, v in resp.getheaders():
                if k.lower() in _HOP_HEADERS:
                    continue
                if k.lower() == "content-length":
                    if self.command == "HEAD":
                        length_sent = True
                        self.send_header(k, v)
                    continue
                self.send_header(k, v)
            if not length_sent:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            with owner._lock:
                owner.counts["forwarded"] += 1
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

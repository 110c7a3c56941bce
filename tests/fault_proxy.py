"""A small HTTP proxy on loopback that injects faults in front of a real server.

    with FaultProxy("http://127.0.0.1:8000", schedule={3: "429", 5: "reset"}) as proxy:
        ...  # point the client at proxy.url (same path as upstream, e.g. proxy.url + "/v1")
        proxy.faulted  # [(request number, fault), ...]

Faults: ``"429"`` (Too Many Requests with ``Retry-After: 0``), ``"500"`` (a JSON error
body), ``"reset"`` (the connection is closed with a TCP reset and no response) and
``"slow"`` (the answer is held back ``slow_s`` seconds, past the client's timeout, and then the
connection is closed). A fault is chosen per request by ``schedule`` (request number, from 1,
to fault; counting only requests whose path contains ``only``) and then by ``rule``, a
function of ``(number, path, body)`` returning a fault or None. Everything else is forwarded
upstream unchanged. Thread-safe: the proxy serves each connection on its own thread.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("429", "500", "reset", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length", "host"}

Rule = Callable[[int, str, bytes], str | None]


@dataclass
class Record:
    """One request the proxy saw: its number (among requests matching ``only``, else 0),
    method, path, body and the fault injected (None: forwarded)."""

    number: int
    method: str
    path: str
    body: bytes
    fault: str | None


@dataclass
class FaultProxy:
    """The proxy; start and stop it with ``with``. ``schedule`` and ``rule`` may be changed
    while it runs (``heal()`` clears both)."""

    upstream: str
    schedule: dict[int, str] = field(default_factory=dict)
    rule: Rule | None = None
    only: str = "/completions"
    slow_s: float = 3.0
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        for fault in self.schedule.values():
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        parts = urlsplit(self.upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self._count = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def heal(self) -> None:
        """No more faults: every request is forwarded from now on."""
        with self._lock:
            self.schedule = {}
            self.rule = None

    def reset_counts(self) -> None:
        with self._lock:
            self.records = []
            self._count = 0

    # --- what happened ----------------------------------------------------------------------

    @property
    def faulted(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(r.number, r.fault) for r in self.records if r.fault]

    def count(self, path_part: str | None = None, fault: str | None | bool = False) -> int:
        """Requests whose path contains ``path_part`` (default ``only``); ``fault``: only those
        with this fault (None: forwarded ones; False: all)."""
        part = self.only if path_part is None else path_part
        with self._lock:
            return sum(1 for r in self.records if part in r.path
                       and (fault is False or r.fault == fault))

    def bodies(self, path_part: str | None = None) -> list[dict]:
        """The JSON bodies of the requests to ``path_part`` (default ``only``), in order."""
        part = self.only if path_part is None else path_part
        with self._lock:
            chosen = [r.body for r in self.records if part in r.path]
        return [json.loads(b) for b in chosen if b]

    # --- per request ------------------------------------------------------------------------

    def _decide(self, method: str, path: str, body: bytes) -> tuple[int, str | None]:
        with self._lock:
            number = 0
            fault = None
            if self.only in path:
                self._count += 1
                number = self._count
                fault = self.schedule.get(number)
                if fault is None and self.rule is not None:
                    fault = self.rule(number, path, body)
            if fault is not None and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}")
            self.records.append(Record(number, method, path, body, fault))
            return number, fault

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=300)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return resp.status, kept, data
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet under pytest
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        _, fault = self.owner._decide(self.command, self.path, body)
        if fault == "reset":
            self._reset()
            return
        if fault == "slow":
            time.sleep(self.owner.slow_s)
            self._reset()
            return
        if fault in ("429", "500"):
            code = int(fault)
            message = "rate limited by the fault proxy" if code == 429 else \
                "internal error injected by the fault proxy"
            extra = [("Retry-After", "0")] if code == 429 else []
            self._reply(code, [("Content-Type", "application/json"), *extra],
                        json.dumps({"error": {"message": message, "type": "fault"}}).encode())
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            status, kept, data = self.owner._forward(self.command, self.path, headers, body)
        except OSError as exc:
            self._reply(502, [("Content-Type", "application/json")],
                        json.dumps({"error": {"message": f"upstream: {exc}"}}).encode())
            return
        self._reply(status, kept, data)

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client has gone (it timed out)
            self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST (linger 0) and send nothing."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_DELETE = _handle

"""A tiny HTTP server on 127.0.0.1 that injects faults: each request takes the next fault of a
queue (or the standing one), else it is answered normally -- forwarded to an upstream server (the
moto S3 server) or by a function. Faults: ``"reset"`` (the connection is closed with a TCP RST,
no answer), or an HTTP status with an S3-style XML error body (``503`` ServiceUnavailable,
``"slowdown"`` 503 SlowDown, ``403`` AccessDenied, ``404`` NoSuchKey). Counts every request."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

ERRORS = {503: ("ServiceUnavailable", "Service is unable to handle the request."), "slowdown": ("SlowDown", "Slow down"),
          403: ("AccessDenied", "Access Denied"), 404: ("NoSuchKey", "The specified key does not exist.")}

Responder = Callable[[str, str, dict, bytes], tuple[int, dict, bytes]]


class FaultServer:
    def __init__(self, upstream: str | None = None, respond: Responder | None = None):
        self.faults: deque = deque()
        self.always = None  # a fault for every request
        self.requests: list[tuple[str, str, object]] = []  # (method, path, fault or None)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = owner.faults.popleft() if owner.faults else owner.always
                owner.requests.append((self.command, self.path, fault))
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    code, message = ERRORS[fault]
                    status = 503 if fault == "slowdown" else fault
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self._send(status, {"Content-Type": "application/xml"}, payload)
                    return
                if upstream is not None:
                    self._send(*owner._forward(upstream, self.command, self.path, dict(self.headers), body))
                else:
                    self._send(*respond(self.command, self.path, dict(self.headers), body))

            def _send(self, status: int, headers: dict, payload: bytes):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                length = {k.lower(): v for k, v in headers.items()}.get("content-length")
                # a HEAD answer has no body but says the object's size
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _forward(upstream: str, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        parts = urlsplit(upstream)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, dict(response.getheaders()), payload
        finally:
            conn.close()

    def fail_next(self, *faults) -> None:
        self.faults.extend(faults)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

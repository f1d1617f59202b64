"""Faults a client causes, each a point fault acted out on the target's wire:
- `abort_mid_stream`: a streamed request closed after its first chunks;
- `disconnect`: a request whose connection closes before any answer is read.
Duplicate request ids (two different prompts under one X-Request-Id at once) and floods are
ordinary requests, judged like any other, so they live in the black-box runner.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Callable

from pdcheck.client.http import body
from pdcheck.faults.api import record
from pdcheck.types import GenRequest


def connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)


def abort_mid_stream(url: str, model: str, request: GenRequest, chunks: int = 2, timeout_s: float = 60.0) -> str:
    conn = connection(url, timeout_s)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body(request, model, True)),
                     {"Content-Type": "application/json", "X-Request-Id": request.request_id})
        response = conn.getresponse()
        seen = 0
        while seen < chunks:
            line = response.fp.readline()
            if not line:
                return f"stream ended after {seen} chunks (HTTP {response.status})"
            seen += line.startswith(b"data:")
        return f"closed the stream after {seen} chunks"
    finally:
        conn.close()


def disconnect(url: str, model: str, request: GenRequest) -> str:
    parts = urllib.parse.urlsplit(url)
    payload = json.dumps(body(request, model, False)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {request.request_id}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as sock:
        sock.sendall(head + payload)
    return "closed the connection before reading an answer"


ACTS: dict[str, Callable[[str, str, GenRequest], str]] = {"abort-mid-stream": abort_mid_stream,
                                                          "disconnect": disconnect}


class ClientFault:
    """One client fault as a fault: `inject()` acts it out and writes what happened on the wire;
    the connection is gone when it returns, so `heal()` has nothing to do."""

    def __init__(self, name: str, url: str, model: str, prompt: GenRequest, history, config: str = ""):
        self.name, self.url, self.model, self.history, self.config = name, url, model, history, config
        self.request = GenRequest(f"{name}-len{len(prompt.prompt)}", prompt.prompt, prompt.max_tokens)

    def inject(self) -> None:
        detail = ACTS[self.name](self.url, self.model, self.request)
        record(self.history, self.name, "act", config=self.config, request_id=self.request.request_id, detail=detail)

    def heal(self) -> None:
        pass


def faults_on(url: str, model: str, prompt: GenRequest, history, config: str = "") -> list[ClientFault]:
    """Each client fault, on `prompt` under its own request id, written under `config`."""
    return [ClientFault(name, url, model, prompt, history, config) for name in ACTS]

"""Faults a client can cause, and operator hooks.

Client faults, each ending in a short description of what happened on the wire:
- `abort_mid_stream`: a streamed request closed after its first chunks;
- `disconnect`: a request whose connection closes before any answer is read;
- duplicate request ids (two different prompts under one X-Request-Id at once) and floods are
  ordinary requests, judged like any other, so they live in the runner.
Hooks: shell commands the user passed (`--hook N:CMD`, `--heal N:CMD`), run before the N-th
workload request; every heal not yet run is run at the end, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass

from pdcheck.client.http import body
from pdcheck.errors import BadInput
from pdcheck.history import Fault
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


@dataclass(frozen=True)
class Hook:
    at: int  # run before this workload request (0-based)
    command: str
    heal: bool

    @classmethod
    def parse(cls, text: str, heal: bool) -> Hook:
        at, sep, command = text.partition(":")
        if not sep or not at.strip().isdigit() or not command.strip():
            raise BadInput(f"{'--heal' if heal else '--hook'} {text!r}: expected N:COMMAND (run before request N)")
        return cls(int(at), command.strip(), heal)

    def run(self, history, timeout_s: float = 60.0) -> None:
        started = time.monotonic()
        try:
            done = subprocess.run(self.command, shell=True, capture_output=True, text=True, timeout=timeout_s)
            returncode, output = done.returncode, (done.stdout + done.stderr)[-500:]
        except subprocess.TimeoutExpired:
            returncode, output = None, f"still running after {timeout_s}s; stopped"
        history.record(Fault(fault="hook", phase="heal" if self.heal else "inject", command=self.command,
                             before_request=self.at, seconds=round(time.monotonic() - started, 3),
                             returncode=returncode, output=output))


class Schedule:
    """The user's hooks and heals; each runs once."""

    def __init__(self, hooks: list[Hook]):
        self.hooks, self.done = hooks, set()

    def before(self, indices, history) -> None:
        """Run the hooks due before any of these workload requests."""
        wanted = set(indices)
        for hook in self.hooks:
            if hook.at in wanted and hook not in self.done:
                self.done.add(hook)
                hook.run(history)

    def heal_all(self, history) -> None:
        """Every heal not yet run, now (the final heal, also after a failure)."""
        for hook in self.hooks:
            if hook.heal and hook not in self.done:
                self.done.add(hook)
                hook.run(history)

"""The client role: batches of requests through the PD path, each answered with a PDResult.

Two clients, one protocol:
- `legs.LegsClient`: in process, the two legs sent by pdcheck itself to the pair of instances the
  deployment plans for the batch (prefill with max_tokens=1, then decode);
- `http.ProxyClient`: over HTTP through a PD proxy, which picks the pair and joins the legs.
A client never starts or stops an instance; clusters own processes (pdcheck.cluster).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pdcheck.types import GenRequest, PDResult


class Client(Protocol):
    def pair(self, batch: int) -> tuple | None:
        """The (prefill, decode) instances the `batch`-th batch goes to, where the client picks
        them (a fault targets them); None where a proxy picks."""

    def send(self, requests: list[GenRequest], batch: int, deadline_s: float,
             between: Callable[[], bool] | None = None) -> list[PDResult]:
        """The batch through both legs; `between()` runs between them where the client sends the
        legs itself (returning True: the client abandons the batch before its decode leg)."""

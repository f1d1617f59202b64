"""Protocol-tier mutants: the connector core broken on purpose, each a line from the correct code.

suites/test_protocol_model.py runs its state machine (pdcheck.testing.memory_transport) on each
and must find a failing example. The line that differs from the correct code is marked `BUG`.
"""

from __future__ import annotations

from pdcheck.connector.buffers import Inbox
from pdcheck.connector.tcp import KVClient

FOREVER_S = 1e9


class TakeKeepsKV(Inbox):
    """Decode's load takes pushed KV, but the inbox keeps holding it (a receive store not freed
    after its load, the leak class of P2P connectors' receive buffers): its room is never given
    back and a second take would get it again (caught as an inbox still holding bytes once every
    transfer ended and its hold passed)."""

    def take(self, key: str, deadline_s: float):
        data = super().take(key, deadline_s)
        if data is not None:
            self.entries[key] = data  # BUG: the taken KV stays held
        return data


class NoReplyDeadline(KVClient):
    """A control request that waits for its reply however long it takes (the unbounded waits of
    early connector code, vLLM #44831): a lost announce or a crashed peer leaves the transfer
    waiting past its deadline (caught as a wait that does not end by its deadline)."""

    def request(self, address, frames, deadline_s, key=None):
        return super().request(address, frames, FOREVER_S, key)  # BUG: the caller's deadline dropped

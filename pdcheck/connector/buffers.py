"""Where KV waits between the engine and the wire, with bounds and deadlines.

Outbox (prefill): KV extracted at save time, keyed by transfer key, with its frame header
(checksum included) made at save time too, until a peer pulls it or it expires. Either way its request is reported as done sending, so vLLM frees its blocks.
Inbox (decode): KV pushed by a peer until decode's load takes it. It holds at most
`capacity_bytes` in its buffer plus `spill_bytes` in a host pool beside it. A push reserves its
room when announced; one that fits in neither is refused (the sender sees an error, the load
fails cleanly and is reported). A reservation whose bytes never come lapses after its hold, and
pushed KV that no load claims within hold_s is dropped.
Both read time through `clock` and the Inbox waits on a `condition()` (time.monotonic and
threading.Condition; the protocol model, pdcheck.testing.memory_transport, passes a fake clock and a
condition that waits in that clock's time).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

log = logging.getLogger("pdcheck.connector")


class Outbox:
    def __init__(self, hold_s: float, clock=time.monotonic):
        self.hold_s, self.clock = hold_s, clock
        self.lock = threading.Lock()
        self.waiting: dict[str, tuple[str, Any, float]] = {}
        self.done: set[str] = set()

    def put(self, key: str, request_id: str, frame: Any) -> None:
        """`frame`: what a pull of `key` is answered with (the TCP plane's header and bytes)."""
        with self.lock:
            self.waiting[key] = (request_id, frame, self.clock() + self.hold_s)

    def peek(self, key: str) -> Any | None:
        with self.lock:
            entry = self.waiting.get(key)
            return entry[1] if entry else None

    def take(self, key: str) -> Any | None:
        with self.lock:
            entry = self.waiting.pop(key, None)
            if entry is None:
                return None
            self.done.add(entry[0])
            return entry[1]

    def mark_done(self, request_id: str) -> None:
        with self.lock:
            self.done.add(request_id)

    def finished(self) -> set[str]:
        """Requests whose KV left (or expired) since the last call."""
        now = self.clock()
        with self.lock:
            for key, (request_id, _, expires) in list(self.waiting.items()):
                if expires < now:
                    del self.waiting[key]
                    self.done.add(request_id)
            done, self.done = self.done, set()
        return done

    @property
    def num_waiting(self) -> int:
        with self.lock:
            return len(self.waiting)


class Inbox:
    def __init__(self, capacity_bytes: int, spill_bytes: int, hold_s: float | None = None,
                 clock=time.monotonic, condition=threading.Condition):
        """`hold_s`: how long pushed KV waits for its load before it is dropped (None: forever)."""
        self.capacity_bytes, self.spill_bytes, self.hold_s = capacity_bytes, spill_bytes, hold_s
        self.clock = clock
        self.cond = condition()
        self.entries: dict[str, torch.Tensor] = {}
        self.expires: dict[str, float] = {}
        self.reserved: dict[str, tuple[int, float]] = {}  # key: (bytes, lapses at)

    @property
    def used_bytes(self) -> int:
        now = self.clock()
        held = sum(t.numel() * t.element_size() for t in self.entries.values())
        return held + sum(size for size, lapses in self.reserved.values() if lapses > now)

    def reserve(self, key: str, size: int, hold_s: float) -> None:
        with self.cond:
            now = self.clock()
            self.reserved = {k: v for k, v in self.reserved.items() if v[1] > now and k != key}
            self.make_room(key, size)
            self.reserved[key] = (size, self.clock() + hold_s)

    def is_reserved(self, key: str, size: int) -> bool:
        with self.cond:
            return self.reserved.get(key, (None,))[0] == size

    def release(self, key: str) -> None:
        with self.cond:
            self.reserved.pop(key, None)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store under `key`, in the room reserved for it (or in free room, if none was)."""
        with self.cond:
            if self.reserved.pop(key, None) is None:
                self.make_room(key, tensor.numel() * tensor.element_size())
            self.entries[key] = tensor
            if self.hold_s is not None:
                self.expires[key] = self.clock() + self.hold_s
            self.cond.notify_all()

    def make_room(self, key: str, size: int) -> None:
        self.drop_unclaimed()
        if self.used_bytes + size > self.capacity_bytes + self.spill_bytes:
            raise BufferError(f"receive buffer full: {key} needs {size} bytes, "
                              f"{self.used_bytes} of {self.capacity_bytes + self.spill_bytes} in use")

    def expire(self) -> None:
        """Drop what is past its hold now: the plane's server calls this as it polls, so the
        buffer empties on time even when no further push comes to make room."""
        with self.cond:
            self.drop_unclaimed()

    def drop_unclaimed(self) -> None:
        """Drop KV whose load never came within hold_s (a decode leg that was never sent), so
        it cannot fill the buffer for good."""
        now = self.clock()
        for key in [k for k, expires in self.expires.items() if expires < now]:
            del self.entries[key], self.expires[key]
            log.warning("dropped pushed KV %s: no load claimed it within %ss", key, self.hold_s)

    def take(self, key: str, deadline_s: float) -> torch.Tensor | None:
        end = self.clock() + deadline_s
        with self.cond:
            while key not in self.entries:
                left = end - self.clock()
                if left <= 0:
                    return None
                self.cond.wait(left)
            self.expires.pop(key, None)
            return self.entries.pop(key)

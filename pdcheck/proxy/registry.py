"""Instances known to the proxy, by heartbeat.

An instance joins with its first heartbeat and is appended to its role's list; later
heartbeats only refresh its last-seen time, so they never change the routing order (the old
proxy popped and re-inserted an instance on every heartbeat, which skewed round-robin).
`expire` drops every instance silent for longer than the timeout, wherever it sits in the
list; a dropped instance that heartbeats again rejoins at the end.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


@dataclasses.dataclass
class Member:
    address: str
    role: str
    last_seen: float


class Registry:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s {timeout_s!r}: must be positive")
        self.timeout_s, self.clock = timeout_s, clock
        self.members: dict[str, list[Member]] = {}

    def heartbeat(self, role: str, address: str) -> bool:
        """Note a heartbeat; True if the instance (re)joined with it."""
        now = self.clock()
        for member in self.members.setdefault(role, []):
            if member.address == address:
                member.last_seen = now
                return False
        self.members[role].append(Member(address, role, now))
        return True

    def expire(self) -> list[Member]:
        """Drop every member silent past the timeout; the dropped ones."""
        now = self.clock()
        dropped = []
        for role, members in self.members.items():
            dropped += [m for m in members if now - m.last_seen > self.timeout_s]
            self.members[role] = [m for m in members if now - m.last_seen <= self.timeout_s]
        return dropped

    def leave(self, role: str, address: str) -> None:
        self.members[role] = [m for m in self.members.get(role, []) if m.address != address]

    def addresses(self, role: str) -> list[str]:
        return [m.address for m in self.members.get(role, [])]

"""Routing policies: which instance of a role gets the next request.

A policy sees the role's current addresses (in join order) and picks one. It is the seam the
nemesis replaces with an uneven or adversarial policy. `started`/`finished` tell a policy
about requests in flight (least-outstanding uses them; the others ignore them).
"""

from __future__ import annotations

import random
from collections import Counter


class NoInstance(LookupError):
    """No instance of the role is registered."""


class Policy:
    def pick(self, role: str, addresses: list[str]) -> str:
        raise NotImplementedError

    def started(self, address: str) -> None:
        pass

    def finished(self, address: str) -> None:
        pass


def require(role: str, addresses: list[str]) -> None:
    if not addresses:
        raise NoInstance(f"no {role} instance is registered")


class RoundRobin(Policy):
    """The n-th request of a role goes to instance n mod k, whatever the heartbeat timing."""

    def __init__(self):
        self.count: Counter[str] = Counter()

    def pick(self, role: str, addresses: list[str]) -> str:
        require(role, addresses)
        chosen = addresses[self.count[role] % len(addresses)]
        self.count[role] += 1
        return chosen


class SeededRandom(Policy):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, role: str, addresses: list[str]) -> str:
        require(role, addresses)
        return self.rng.choice(addresses)


class LeastOutstanding(Policy):
    """The instance with the fewest requests in flight; ties go to the earliest joined."""

    def __init__(self):
        self.outstanding: Counter[str] = Counter()

    def pick(self, role: str, addresses: list[str]) -> str:
        require(role, addresses)
        return min(addresses, key=lambda a: self.outstanding[a])

    def started(self, address: str) -> None:
        self.outstanding[address] += 1

    def finished(self, address: str) -> None:
        self.outstanding[address] -= 1


POLICIES = {"round_robin": RoundRobin, "random": SeededRandom, "least_outstanding": LeastOutstanding}

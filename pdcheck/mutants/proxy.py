"""Proxy mutants: the known proxy bugs, a few lines away from pdcheck.proxy.registry."""

from __future__ import annotations

from pdcheck.proxy.registry import Member, Registry


class ReinsertOnHeartbeat(Registry):
    """Uneven polling (vLLM #21819): every heartbeat pops the instance and appends it again,
    so `count % n` round-robin shifts whenever an instance heartbeats between requests."""

    def heartbeat(self, role: str, address: str) -> bool:
        members = self.members.setdefault(role, [])
        known = any(m.address == address for m in members)
        self.members[role] = [m for m in members if m.address != address]
        self.members[role].append(Member(address, role, self.clock()))
        return not known


class ExpireStopsAtFirstLive(Registry):
    """Stale instances: expiry scans from the front and stops at the first live entry, so an
    expired instance behind a live one stays routable."""

    def expire(self) -> list[Member]:
        now, dropped = self.clock(), []
        for role, members in self.members.items():
            while members and now - members[0].last_seen > self.timeout_s:
                dropped.append(members.pop(0))
        return dropped

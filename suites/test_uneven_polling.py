"""Uneven polling and stale instances: the proxy's round-robin stays fair whatever the
heartbeat order, expiry drops a silent instance wherever it sits, and it can rejoin. Each check also runs against the known proxy bug as a mutant
(pdcheck.mutants.proxy), which it must catch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdcheck.mutants.proxy import ExpireStopsAtFirstLive, ReinsertOnHeartbeat
from pdcheck.proxy.policies import LeastOutstanding, NoInstance, RoundRobin, SeededRandom
from pdcheck.proxy.registry import Registry
from pdcheck.testing.clock import FakeClock

PREFILLS, DECODES = ["p0", "p1", "p2"], ["d0", "d1"]


def registry(cls=Registry, timeout_s: float = 3.0) -> tuple[Registry, FakeClock]:
    clock = FakeClock(now=0.0)
    reg = cls(timeout_s, clock)
    for address in PREFILLS:
        reg.heartbeat("prefill", address)
    for address in DECODES:
        reg.heartbeat("decode", address)
    return reg, clock


def unfair_counts(cls, events: list[str]) -> dict[str, int]:
    """Route every "req" event round-robin (heartbeats in between); the counts off floor/ceil."""
    reg, _ = registry(cls)
    policy = RoundRobin()
    counts = {a: 0 for a in PREFILLS + DECODES}
    for event in events:
        if event == "req":
            counts[policy.pick("prefill", reg.addresses("prefill"))] += 1
            counts[policy.pick("decode", reg.addresses("decode"))] += 1
        else:
            reg.heartbeat("prefill" if event.startswith("p") else "decode", event)
    n = events.count("req")
    bad = {}
    for group in (PREFILLS, DECODES):
        low, high = n // len(group), -(-n // len(group))
        bad |= {a: counts[a] for a in group if not low <= counts[a] <= high}
    return bad


events = st.lists(st.sampled_from(["req", *PREFILLS, *DECODES]), max_size=60)


@settings(max_examples=300)
@given(events)
def test_round_robin_gives_each_instance_floor_or_ceil_whatever_the_heartbeats(sequence):
    assert unfair_counts(Registry, sequence) == {}


def test_heartbeat_between_two_requests_does_not_skew_round_robin():
    """The trigger of vLLM #21819: A then B registered; a request; A heartbeats; next goes to B."""
    reg, _ = registry()
    policy = RoundRobin()
    first = policy.pick("decode", reg.addresses("decode"))
    reg.heartbeat("decode", first)
    assert policy.pick("decode", reg.addresses("decode")) != first
    assert unfair_counts(Registry, ["req", "d0", "req"]) == {}


def test_reinsert_on_heartbeat_mutant_is_caught():
    assert unfair_counts(ReinsertOnHeartbeat, ["req", "d0", "req"]) != {}


def expire_middle(cls) -> list[str]:
    """p1 (in the middle) falls silent while p0 and p2 keep heartbeating every second."""
    reg, clock = registry(cls, timeout_s=3.0)
    for _ in range(4):  # timeout + one interval
        clock.now += 1.0
        reg.heartbeat("prefill", "p0")
        reg.heartbeat("prefill", "p2")
        reg.expire()
    return reg.addresses("prefill")


def test_silent_instance_in_the_middle_expires_within_timeout_plus_one_interval():
    assert expire_middle(Registry) == ["p0", "p2"]


def test_expiry_that_stops_at_the_first_live_entry_is_caught():
    assert expire_middle(ExpireStopsAtFirstLive) != ["p0", "p2"]


def test_expired_instance_rejoins_at_the_end_without_restart():
    reg, clock = registry(timeout_s=1.0)
    clock.now = 5.0
    reg.heartbeat("prefill", "p2")
    assert [m.address for m in reg.expire()] == ["p0", "p1", "d0", "d1"]
    assert reg.heartbeat("prefill", "p0") is True
    assert reg.addresses("prefill") == ["p2", "p0"]


def test_seeded_random_is_reproducible_and_least_outstanding_balances():
    picks = [SeededRandom(7).pick("prefill", PREFILLS) for _ in range(3)]
    assert picks == [SeededRandom(7).pick("prefill", PREFILLS) for _ in range(3)]
    policy = LeastOutstanding()
    first = policy.pick("decode", DECODES)
    policy.started(first)
    second = policy.pick("decode", DECODES)
    assert second != first
    policy.finished(first)
    assert policy.pick("decode", DECODES) == first


def test_no_instance_is_a_clear_error():
    with pytest.raises(NoInstance, match="no decode instance"):
        RoundRobin().pick("decode", [])

"""Transfer handles past their life: a decode leg that comes after prefill's hold or lease has run
out, and transfer parameters already consumed, replayed on another decode request.

Field reports: 8 of 42 requests decoded from KV blocks prefill had already released, all HTTP
200 (a NIXL lease running out while decode was backlogged); consumed kv_transfer_params replayed
and served stale. In both tests prefill's pool is small (REUSED_POOL blocks) and three more
prompts go through both legs before the late or replayed decode leg, so every block the first
request had now holds another prompt's KV. That leg must end with the oracle's tokens (recomputed,
or from a copy the connector still keeps) or as a clean error: never from another request's KV,
never hung; the other prompts match, and nothing is held after the drain.
"""

from __future__ import annotations

import dataclasses
import time

import msgspec
import pytest

from pdcheck.checker.compare import judge
from pdcheck.client.legs import decode_request, join, prefill_request, run_pd
from pdcheck.conformance.battery import DEADLINE_S, drain_s, prompts, replay_line, run, verdict
from pdcheck.gate import drain
from pdcheck.profiles import FailureClass
from pdcheck.types import Outcome

FAILURE_CLASS = FailureClass.HANDLES
LATE_BY_S = 2.0  # past the hold or lease
REUSED_POOL = 10  # prefill's KV blocks: three more 129-token prompts reuse every block of the first
CLEAN = {Outcome.MATCH, Outcome.ERROR}


def second_leg_after_reuse(spec, pd_pool, pd_history, tag: str, consume: bool, wait_s: float = 0.0):
    """The first of four 129-token prompts through prefill (and, if `consume`, through decode
    too); `wait_s` later, the other three through both legs; then the first one's decode leg
    (again) under a new id. Returns the lines of what ended outside what is allowed."""
    prefill_spec = dataclasses.replace(spec, num_blocks=REUSED_POOL)
    first, *others = prompts(spec, [129] * 4, tag)
    deployment, oracle = pd_pool.get(prefill_spec, spec)
    prefill, decode = deployment.pair(0)
    calibration = oracle.calibration or oracle.calibrate([first])
    expected = oracle.results([first])[0]
    if consume:
        done = run_pd(prefill, decode, spec.connector, [first], DEADLINE_S)[0]
        prefilled, legs = done.prefill, [("first", done.result, {Outcome.MATCH})]
    else:
        prefilled, legs = prefill.generate([prefill_request(first, spec.connector, decode)], DEADLINE_S)[0], []
    time.sleep(wait_s)
    fillers = run(pd_pool, pd_history, prefill_spec, others, decode_spec=spec)
    second = msgspec.structs.replace(decode_request(first, prefilled, spec.connector), request_id=f"{first.request_id}-{tag}")
    legs.append((tag, join(prefilled, decode.generate([second], DEADLINE_S)[0], spec.connector), CLEAN))
    lines = [f"leak after drain: {leak}" for leak in drain(deployment, pd_history, tag, drain_s(spec))[0]]
    for name, got, allowed in legs:
        judged = judge(expected, got, calibration.rule, calibration.tolerance, got.external_tokens, 0)
        if judged.outcome not in allowed:
            lines.append(f"{name} {got.request_id}: {judged.outcome.value}: {judged.detail} "
                         f"(loaded {got.external_tokens} tokens)")
    return lines, fillers


@pytest.mark.vllm
def test_a_decode_leg_after_the_lease_never_reads_reused_blocks(spec, pd_pool, pd_history, request):
    """The decode leg comes LATE_BY_S after the connector's hold or lease ran out, and after
    three more prompts reused prefill's blocks."""
    lines, fillers = second_leg_after_reuse(spec, pd_pool, pd_history, "late", consume=False,
                                            wait_s=spec.connector.profile.lease_s + LATE_BY_S)
    message = "\n".join(lines + ([verdict(fillers, request, spec)] if fillers.failures() else []))
    assert not lines and not fillers.failures(), message + "\n" + replay_line(request, spec)


@pytest.mark.vllm
def test_replayed_transfer_params_are_refused_or_recomputed(spec, pd_pool, pd_history, request):
    """The first request goes through both legs; after three more prompts reused prefill's
    blocks, its decode leg is sent again with the transfer parameters it consumed."""
    lines, fillers = second_leg_after_reuse(spec, pd_pool, pd_history, "replayed", consume=True)
    message = "\n".join(lines + ([verdict(fillers, request, spec)] if fillers.failures() else []))
    assert not lines and not fillers.failures(), message + "\n" + replay_line(request, spec)

"""Transfer handles past their life: a decode leg that comes after prefill's hold or lease has run
out, and transfer parameters already consumed, replayed on another decode request.

Field reports: 8 of 42 requests decoded from KV blocks prefill had already released, all HTTP
200 (a NIXL lease running out while decode was backlogged); consumed kv_transfer_params replayed
and served stale. Either request must end with the oracle's tokens (loaded, or recomputed) or as
a clean error: never from KV that is now another request's, never hung, nothing held after.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from pdcheck.checker.compare import Outcome, judge
from pdcheck.conformance.battery import DEADLINE_S, prompts, replay_line, run, verdict
from pdcheck.nemesis.schedule import Planned
from pdcheck.pd import decode_request, join, run_pd
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.HANDLES
LATE_BY_S = 2.0  # past the hold or lease
REUSED_POOL = 10  # prefill's KV blocks: a few 129-token prompts reuse every block of the first


@pytest.mark.vllm
def test_a_decode_leg_after_the_lease_ends_cleanly_and_the_rest_match(spec, pd_pool, pd_history, request):
    """The second of three requests reaches decode LATE_BY_S after the connector's hold or lease
    ran out: it may end as a clean error or recomputed, never diverged; the others match."""
    late = Planned(1, "late", spec.connector.profile.lease_s + LATE_BY_S)
    result = run(pd_pool, pd_history, spec, prompts(spec, [65, 129, 95], "late"), faults=[late])
    message = verdict(result, request, spec, when_faulted=(Outcome.MATCH, Outcome.ERROR, Outcome.FALLBACK,
                                                          Outcome.PARTIAL))
    assert not message, message


@pytest.mark.vllm
def test_replayed_transfer_params_are_refused_or_recomputed(spec, pd_pool, pd_history, request):
    """A request goes through both legs; three more prompts reuse all of prefill's blocks (a
    pool of REUSED_POOL); then the first request's decode leg is sent again under a new id with
    the transfer parameters it consumed. The replay must match the oracle (recomputed, or loaded
    from a copy still kept) or fail cleanly."""
    prefill_spec = dataclasses.replace(spec, num_blocks=REUSED_POOL)
    first, *others = prompts(spec, [129] * 4, "replayed")
    deployment, oracle = pd_pool.get(prefill_spec, spec)
    prefill, decode = deployment.pair(0)
    calibration = oracle.calibration or oracle.calibrate([first])
    expected = oracle.results([first])[0]
    done = run_pd(prefill, decode, spec.connector, [first], DEADLINE_S)[0]
    fillers = run(pd_pool, pd_history, prefill_spec, others, decode_spec=spec)
    again = msgspec.structs.replace(decode_request(first, done.prefill, spec.connector),
                                    request_id=f"{first.request_id}-again")
    replayed = join(done.prefill, decode.generate([again], DEADLINE_S)[0], spec.connector)
    lines = []
    for name, got, allowed in (("first", done.result, {Outcome.MATCH}),
                               ("replayed", replayed, {Outcome.MATCH, Outcome.ERROR})):
        judged = judge(expected, got, calibration.rule, calibration.tolerance, got.external_tokens, 0)
        if judged.outcome not in allowed:
            lines.append(f"{name} {got.request_id}: {judged.outcome.value}: {judged.detail} "
                         f"(loaded {got.external_tokens} tokens)")
    message = "\n".join(lines + ([verdict(fillers, request, spec)] if fillers.failures() else []))
    assert not lines and not fillers.failures(), message + "\n" + replay_line(request, spec)

"""Prefill or decode paused (SIGSTOP) or killed while a request's KV is on its way.

A paused prefill meets decode's load with a silent peer; a paused decode starts late; a killed
prefill never answers, and is restarted before the next request (which must not get KV from
the old incarnation); a restarted prefill (killed, then started again on the same address before
decode's leg) answers decode's load as a new incarnation that never had the KV. A faulted request ends with the oracle's tokens, or as a clean error, or
recomputed where the profile promises recompute; never diverged, hung or held. Every request
after it must match."""

from __future__ import annotations

import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass, OnPrefillLoss
from pdcheck.types import Outcome, Planned

FAILURE_CLASS = FailureClass.PROCESS_FAULTS
LENGTHS = [65, 95, 129]
FAULTS = {
    "prefill-paused": Planned(1, "prefill", 2.5),
    "decode-paused": Planned(1, "decode", 2.5),
    "prefill-killed": Planned(1, "kill", 0.0),
    "prefill-restarted": Planned(1, "restart", 0.0),
}


@pytest.mark.vllm
@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulted_request_ends_cleanly_and_the_next_ones_match(fault, spec, pd_pool, pd_history, request):
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, fault), faults=[FAULTS[fault]])
    recompute = spec.connector.profile.on_prefill_loss is OnPrefillLoss.RECOMPUTE
    faulted = (Outcome.MATCH, Outcome.ERROR) + ((Outcome.FALLBACK, Outcome.PARTIAL) if recompute else ())
    message = verdict(result, request, spec, when_faulted=faulted)
    assert not message, message

"""Client aborts between the legs: the client abandons a request after prefill, so decode
never hears of it (vLLM #46283: the abort path skipped the free). Prefill must let go of what
it holds for it within the connector's hold or lease (the drain waits that long); the
abandoned request ends as that error, and every other request matches."""

from __future__ import annotations

import pytest

from pdcheck.checker.compare import Outcome
from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.nemesis.schedule import Planned
from pdcheck.pd import ABANDONED
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.ABORTS
LENGTHS = [33, 65, 95, 129]


@pytest.mark.vllm
def test_abandoned_requests_are_freed_and_the_rest_match(spec, pd_pool, pd_history, request):
    faults = [Planned(1, "abort", 0.0), Planned(2, "abort", 0.0)]
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, "abort"), faults=faults)
    message = verdict(result, request, spec, allowed=(Outcome.MATCH, Outcome.ERROR))
    assert not message, message
    abandoned = [c.prompt_len for c in result.checked if c.verdict.detail == ABANDONED]
    assert abandoned == [65, 95], [(c.prompt_len, c.verdict.outcome.value, c.verdict.detail) for c in result.checked]

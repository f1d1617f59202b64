"""Client aborts between and during the legs.

Between the legs, the client abandons a request after prefill, so decode never hears of it
(vLLM #46283: the abort path skipped the free): prefill must let go of what it holds for it
within the connector's hold or lease (the drain waits that long). During a leg, the client goes
while prefill is still computing the prompt (prefilled in chunks, so a request takes several
steps), or while decode is loading or has just loaded its KV: the connector must drop what it
had started for that request (a load in flight written into blocks already given to another
request shows as a divergence later). An aborted request ends as that error; every other
request, in the same batch and after it, matches; nothing is held after the drain.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from pdcheck.client.legs import ABANDONED
from pdcheck.conformance.battery import prompts, replay_line, run, verdict
from pdcheck.profiles import FailureClass
from pdcheck.report.terminal import failure_line
from pdcheck.types import Outcome, Planned

FAILURE_CLASS = FailureClass.ABORTS
LENGTHS = [33, 65, 95, 129]
CHUNK = 64  # prefill's tokens per step for the mid-prefill abort: a 129-token prompt takes three


@pytest.mark.vllm
def test_abandoned_requests_are_freed_and_the_rest_match(spec, pd_pool, pd_history, request):
    faults = [Planned(1, "abort", 0.0), Planned(2, "abort", 0.0)]
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, "abort"), faults=faults)
    message = verdict(result, request, spec, allowed=(Outcome.MATCH, Outcome.ERROR))
    assert not message, message
    abandoned = [c.prompt_len for c in result.checked if c.verdict.detail == ABANDONED]
    assert abandoned == [65, 95], [(c.prompt_len, c.verdict.outcome.value, c.verdict.detail) for c in result.checked]


@pytest.mark.vllm
@pytest.mark.parametrize("leg, step", [("prefill", 1), ("decode", 0), ("decode", 1)],
                         ids=["mid-prefill", "decode-before-its-first-step", "decode-after-its-first-step"])
def test_requests_aborted_during_a_leg_end_as_errors_and_the_rest_match(leg, step, spec, pd_pool, pd_history,
                                                                        request):
    """Two batches of four: the first opens with a 129-token request (the first the engine
    schedules), aborted on `leg` before that engine's `step`-th step of the batch; the second
    must match whole. For the prefill leg, prefill computes CHUNK tokens a step, so the abort
    comes when 64 of the prompt's tokens are computed."""
    prefill = dataclasses.replace(spec, max_num_batched_tokens=CHUNK) if leg == "prefill" else spec
    sent = prompts(spec, LENGTHS[::-1] * 2, f"abort-{leg}-{step}")
    sent[0] = msgspec.structs.replace(sent[0], abort_leg=leg, abort_step=step)
    result = run(pd_pool, pd_history, prefill, sent, concurrency=len(LENGTHS), decode_spec=spec)
    message = verdict(result, request, spec, allowed=(Outcome.MATCH, Outcome.ERROR))
    assert not message, message
    errors = [c for c in result.checked if c.verdict.outcome is Outcome.ERROR]
    assert [c.verdict.request_id for c in errors] == [sent[0].request_id], "\n".join(
        ["only the aborted request may end as an error:", *map(failure_line, errors), replay_line(request, spec)])

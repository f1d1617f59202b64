"""KV-pool pressure on decode: a pool so small that running requests are preempted while they
generate, and resumed (vLLM #53250: after a preemption decode asked again for KV it had
consumed, then hung or crashed). A resumed request may recompute its prompt (it then shows as
a fallback or a partial load), but it must end with the oracle's tokens, and some requests
must have loaded their KV, or nothing was tested."""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.conformance.battery import loaded_fully, prompts, run, verdict
from pdcheck.profiles import FailureClass
from pdcheck.types import Outcome

FAILURE_CLASS = FailureClass.PREEMPTION
DECODE_POOL = 13  # blocks: 12 usable, four 90-token prompts' worth; each needs a 4th block as it generates
LENGTHS = [90] * 6


@pytest.mark.vllm
def test_requests_preempted_on_decode_resume_with_the_oracles_tokens(spec, pd_pool, pd_history, request):
    decode = dataclasses.replace(spec, num_blocks=DECODE_POOL)
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, "preempt"), concurrency=len(LENGTHS),
                 decode_spec=decode)
    message = verdict(result, request, spec, allowed=(Outcome.MATCH, Outcome.FALLBACK, Outcome.PARTIAL))
    assert not message, message
    assert loaded_fully(result, spec), "no request loaded its KV: the pressure left nothing to test"

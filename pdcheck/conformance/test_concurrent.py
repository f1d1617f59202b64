"""Distinct prompts at once: several requests' KV land in one decode step, or arrive across
steps. KV delivered to the wrong request, or one request's blocks written over another's,
shows as a divergence here and nowhere in a one-at-a-time workload."""

from __future__ import annotations

import msgspec
import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.CONCURRENT
# one-block, partial and multi-block prompts side by side (exact multiples of the block size are
# the equivalence class's edge; here they would only repeat what it records for a connector)
LENGTHS = [31, 33, 63, 80, 95, 129]


@pytest.mark.vllm
def test_distinct_prompts_in_one_decode_step_each_get_their_own_kv(spec, pd_pool, pd_history, request):
    requests = prompts(spec, LENGTHS, "together")
    result = run(pd_pool, pd_history, spec, requests, concurrency=len(requests))
    assert not verdict(result, request, spec), verdict(result, request, spec)


@pytest.mark.vllm
def test_distinct_prompts_arriving_across_steps_each_get_their_own_kv(spec, pd_pool, pd_history, request):
    """Each request joins the running batch a few engine steps after the one before it, on
    both legs, so loads and saves of different requests overlap at every stage."""
    requests = [msgspec.structs.replace(r, arrive_step=3 * i) for i, r in enumerate(prompts(spec, LENGTHS, "staggered"))]
    result = run(pd_pool, pd_history, spec, requests, concurrency=len(requests))
    assert not verdict(result, request, spec), verdict(result, request, spec)

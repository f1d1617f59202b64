"""Repeated identical prompts (vLLM #22965: identical prompts sent repeatedly gave garbage).

The same prompt goes through PD six times, one after another and all at once, with prefix
caching on prefill (so repeats share its blocks) and a small pool there (so freed blocks are
reused at once). Decode keeps prefix caching off, so what it reports loading is what came
through the connector: each repeat must match the oracle with its KV fully loaded (a repeat
served from decode's own cache, or half loaded, fails), and nothing may be held after."""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.conformance.battery import run, verdict
from pdcheck.profiles import FailureClass
from pdcheck.workload.boundary import repeated_requests

FAILURE_CLASS = FailureClass.REPEATED
REPEATS, PROMPT_LEN, MAX_TOKENS = 6, 80, 8
SMALL_POOL = 24  # blocks: a few requests' worth, so blocks are freed and reused constantly


@pytest.mark.vllm
@pytest.mark.parametrize("concurrency", [1, REPEATS], ids=["sequential", "concurrent"])
def test_repeated_prompt_matches_every_time(concurrency, spec, pd_pool, pd_history, request):
    prefill = dataclasses.replace(spec, prefix_caching=True, num_blocks=SMALL_POOL)
    requests = repeated_requests(1, PROMPT_LEN, REPEATS, MAX_TOKENS, vocab_size=512)
    result = run(pd_pool, pd_history, prefill, requests, concurrency, decode_spec=spec)
    assert not verdict(result, request, spec), verdict(result, request, spec)

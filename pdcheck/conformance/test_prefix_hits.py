"""Decode-side prefix hits: decode has prefix caching on, so a prompt that shares whole blocks
with one it served before finds them in its own cache, and the connector must load only the
rest, into the blocks after the hit. KV loaded from the start of prefill's blocks into the
blocks after the hit, or over the cached ones, shows as a divergence; a connector that loads
nothing and lets decode recompute shows as a fallback or a partial load.

What decode found locally and what it loaded are counted apart (vLLM's scheduler reports them
apart per request; num_cached_tokens is their sum). Requests go one at a time, in order: the
first fills decode's cache, each later one shares 1 to 4 of its blocks.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.PREFIX_HITS
BASE_LEN = 129
SHARED = [96, 128, 32, 64]  # prompt tokens each later request shares with the first


def sharing_requests(spec):
    """The first prompt, then prompts that share its first `SHARED[i]` tokens and go on with
    tokens of their own to the same length."""
    base, *tails = prompts(spec, [BASE_LEN] * (1 + len(SHARED)), "prefix")
    shared = [msgspec.structs.replace(tail, request_id=f"prefix-shares{n}-len{BASE_LEN}",
                                      prompt=base.prompt[:n] + tail.prompt[n:]) for n, tail in zip(SHARED, tails)]
    return [base, *shared, msgspec.structs.replace(base, request_id=f"prefix-again-len{BASE_LEN}")]


@pytest.mark.vllm
def test_prompts_sharing_cached_blocks_on_decode_load_the_rest(spec, pd_pool, pd_history, request):
    decode = dataclasses.replace(spec, prefix_caching=True)
    result = run(pd_pool, pd_history, spec, sharing_requests(spec), decode_spec=decode)
    assert not verdict(result, request, spec), verdict(result, request, spec)
    hits = {c.verdict.request_id: c.local_tokens for c in result.checked}
    assert all(hits[f"prefix-shares{n}-len{BASE_LEN}"] == n for n in SHARED), f"decode's local hits: {hits}"

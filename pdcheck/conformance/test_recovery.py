"""Recovery from a failed load, with vLLM's kv_load_failure_policy "recompute".

Field reports: the recompute path returned wrong output (vLLM #49250); blocks of a failed load
must never be cached and served to the next identical prompt (vLLM's
test_invalid_blocks_correctness). Here decode runs with prefix caching on and the policy
"recompute"; prefill is killed between the legs of the first batch, so every load of that batch
fails. Those requests must end with the oracle's tokens, recomputed (an error breaks the policy's
promise); the same prompts sent right after, prefill restarted, must match too (a block the
failed load left half-written and cached would show there).
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass
from pdcheck.types import Outcome, Planned

FAILURE_CLASS = FailureClass.RECOVERY
LENGTHS = [65, 129]


def recomputing(spec):
    """`spec` with vLLM's kv_load_failure_policy "recompute" among its connector settings."""
    connector = spec.connector
    extra = tuple(sorted(dict(connector.extra_config, kv_load_failure_policy="recompute").items()))
    return dataclasses.replace(spec, connector=dataclasses.replace(connector, extra_config=extra))


@pytest.mark.vllm
def test_failed_loads_recompute_to_the_oracles_tokens_and_poison_no_cached_block(spec, pd_pool, pd_history, request):
    prefill = recomputing(spec)
    decode = dataclasses.replace(prefill, prefix_caching=True)
    first = prompts(spec, LENGTHS, "recovery")
    again = [msgspec.structs.replace(r, request_id=f"{r.request_id}-again") for r in first]
    result = run(pd_pool, pd_history, prefill, first + again, concurrency=len(LENGTHS), decode_spec=decode,
                 faults=[Planned(0, "kill", 0.0)])
    message = verdict(result, request, spec, when_faulted=(Outcome.MATCH, Outcome.FALLBACK, Outcome.PARTIAL))
    assert not message, message

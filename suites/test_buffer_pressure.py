"""Buffer pressure: decode's receive buffer and spill pool hold less than a batch of pushes.

The reference connector in PUT mode pushes each request's KV into decode's Inbox; with 32 KiB
of buffer and 16 KiB of spill (three blocks of the tiny Llama in bfloat16, 16 KiB each), a
batch of four prompts of two and three blocks cannot all fit. A push that does not fit is
refused and its load fails cleanly: with vLLM's `fail` policy the request ends as a clean error,
with `recompute` decode recomputes it and matches. Never a divergence, a hang or a leak; the
transfer logs name each refused load. Negative control: a variant that skips the missing KV
(SkipMissingKV) turns the same pressure into wrong tokens.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.gate import run_config
from pdcheck.types import Outcome
from pdcheck.workload.boundary import boundary_workload

pytestmark = pytest.mark.vllm
TIGHT = '"mode": "put", "buffer_bytes": 32768, "spill_bytes": 16384, "deadline_s": 1'


def pressured(policy: str, name: str = "reference") -> EngineSpec:
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16",
                      connector=connector_spec("reference", f'{{{TIGHT}, "kv_load_failure_policy": "{policy}"}}'))
    if name == "reference":
        return spec
    return dataclasses.replace(spec, connector=dataclasses.replace(spec.connector, name=name))


def run_batches(pd_pool, pd_history, spec: EngineSpec):
    deployment, oracle = pd_pool.get(spec)
    requests = [r for r in boundary_workload(spec) if len(r.prompt) in (63, 65, 95, 97)] * 2
    requests = [msgspec.structs.replace(r, request_id=f"{r.request_id}-{i}") for i, r in enumerate(requests)]
    result = run_config(deployment, requests, pd_history, oracle=oracle, concurrency=4)
    refused = sum(len(t.errors) for t in deployment.transfers().values())
    return result.requests, refused, list(result.leaks)


@pytest.mark.parametrize("policy, allowed", [
    ("fail", {Outcome.MATCH, Outcome.ERROR}),
    pytest.param("recompute", {Outcome.MATCH}, marks=pytest.mark.slow),  # a policy variant: --runslow
])
def test_pushes_that_do_not_fit_end_cleanly_and_leave_nothing_behind(policy, allowed, pd_pool, pd_history):
    checked, refused, leaked = run_batches(pd_pool, pd_history, pressured(policy))
    outcomes = [c.verdict.outcome for c in checked]
    assert set(outcomes) <= allowed, [(c.prompt_len, c.verdict.outcome.value, c.verdict.detail) for c in checked]
    assert refused > 0, "the buffer never filled: the test exerts no pressure"
    if policy == "fail":
        assert outcomes.count(Outcome.ERROR) == refused, (outcomes, refused)
    assert not leaked, leaked


def test_skipping_kv_that_did_not_fit_is_caught_as_divergence(pd_pool, pd_history):
    checked, _, _ = run_batches(pd_pool, pd_history, pressured("fail", "pdcheck.mutants.connector:SkipMissingKV"))
    assert any(c.verdict.outcome is Outcome.DIVERGED for c in checked), [c.verdict.outcome.value for c in checked]

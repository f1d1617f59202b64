"""A seeded nemesis over the gate: prefill paused between the legs (decode's pull meets a silent
peer) and decode paused as a batch starts, for 0.3 to 2.5 s, against a 1 s connector deadline.

Every fault is an inject/heal pair in the history. The reference connector must end every
faulted request as a match or a clean error (vLLM's `fail` policy), never a divergence or a
hang, match every request no fault touched, and hold nothing after the drain (KV nobody pulled
is dropped after hold_s). Negative control: SkipMissingKV under the same schedule diverges.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.cluster.deployment import Deployment
from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.faults.process import PAUSES, plan
from pdcheck.gate import run_config
from pdcheck.history import Fault, read_history
from pdcheck.types import Outcome
from pdcheck.workload.boundary import boundary_workload

pytestmark = pytest.mark.vllm
SEED = 3
SETTINGS = '{"deadline_s": 1, "hold_s": 3, "kv_load_failure_policy": "fail"}'


def run_under_nemesis(pd_run_dir, pd_history, name: str, connector: str, num_requests: int = 8):
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference", SETTINGS))
    spec = dataclasses.replace(spec, connector=dataclasses.replace(spec.connector, name=connector))
    requests = [r for r in boundary_workload(spec) if len(r.prompt) > spec.block_size][:num_requests]
    faults = plan(SEED, len(requests), rate=0.5, kinds=PAUSES)
    with Deployment(spec, pd_run_dir, name) as deployment:
        result = run_config(deployment, requests, pd_history, faults=faults, drain_s=10)
    return faults, result.requests, result.leaks


def test_reference_connector_ends_every_faulted_request_cleanly(pd_run_dir, pd_history):
    faults, checked, leaked = run_under_nemesis(pd_run_dir, pd_history, "nemesis-reference",
                                                "pdcheck.connector.plugin:P2PConnector")
    summary = [(c.prompt_len, c.faulted, c.verdict.outcome.value) for c in checked]
    assert any(f.target == "prefill" and f.seconds > 1 for f in faults), f"the plan cuts nothing off: {faults}"
    assert all(c.passed for c in checked), summary
    assert any(c.faulted and c.verdict.outcome is Outcome.ERROR for c in checked), summary  # a cut-off happened
    assert not leaked, leaked
    pauses = [op for op in read_history(pd_history.path) if isinstance(op, Fault) and op.fault == "pause"]
    assert sum(p.phase == "inject" for p in pauses) == sum(p.phase == "heal" for p in pauses) >= len(faults)


def test_skipping_missing_kv_under_the_same_faults_is_caught(pd_run_dir, pd_history):
    _, checked, _ = run_under_nemesis(pd_run_dir, pd_history, "nemesis-skip", "pdcheck.mutants.connector:SkipMissingKV",
                                      num_requests=4)  # the plan's first fault cuts request 0 off
    assert any(c.verdict.outcome is Outcome.DIVERGED for c in checked), [c.verdict.outcome.value for c in checked]

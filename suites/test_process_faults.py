"""Process faults: an instance paused (SIGSTOP) in the middle of a transfer, then resumed.

Prefill is paused right after its leg, so decode's pull meets a peer that accepts the
connection and says nothing. The pull must end at the connector's deadline (1 s): with vLLM's
`fail` policy the request is a clean error, with `recompute` it matches the oracle. Once
prefill resumes, the next requests match, and after the drain nothing is held: the KV nobody
pulled is dropped after `hold_s` (3 s here) and its blocks freed. Every fault is written to the
history with its window. Decode paused between the legs only delays the request.

Negative control: NoPullDeadline, whose pull retries with no deadline, hangs on the paused
prefill: decode answers nothing until the gate's own deadline ends the request as a hang.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from pdcheck.checker.compare import judge
from pdcheck.client.legs import decode_request, prefill_request
from pdcheck.cluster.deployment import Deployment
from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.gate import DRAIN_S, drain, run_config
from pdcheck.history import Fault, History
from pdcheck.plugin import replay_line as replay
from pdcheck.types import Outcome, Rule
from pdcheck.workload.boundary import boundary_workload

pytestmark = pytest.mark.vllm
DEADLINE_S, HOLD_S = 1, 3


class Paused:
    """SIGSTOP an instance's process for the block's duration (SIGCONT on the way out, always),
    recorded in the history as a fault with its window."""

    def __init__(self, instance, history: History):
        self.instance, self.history = instance, history

    def __enter__(self):
        os.kill(self.instance.process.pid, signal.SIGSTOP)
        self.history.record(Fault(fault="pause", instance=self.instance.name, phase="inject"))

    def __exit__(self, *exc):
        os.kill(self.instance.process.pid, signal.SIGCONT)
        self.history.record(Fault(fault="pause", instance=self.instance.name, phase="heal"))


def settings(policy: str) -> str:
    return f'{{"deadline_s": {DEADLINE_S}, "hold_s": {HOLD_S}, "kv_load_failure_policy": "{policy}"}}'


def pull_from_paused_prefill(deployment, victim, history, deadline_s: float = 30):
    """The victim's prefill leg, then its decode leg with prefill paused: (expected, decoded, seconds)."""
    prefill, decode = deployment.pair(0)
    connector = deployment.spec.connector
    expected = deployment.oracle.generate([victim], 30)[0]
    prefilled = prefill.generate([prefill_request(victim, connector, decode)], 30)[0]
    with Paused(prefill, history):
        started = time.monotonic()
        decoded = decode.generate([decode_request(victim, prefilled, connector)], deadline_s)[0]
        return expected, decoded, time.monotonic() - started


@pytest.mark.parametrize("policy", ["fail", pytest.param("recompute", marks=pytest.mark.slow)])
def test_prefill_paused_during_the_pull_ends_in_time_and_leaves_nothing_held(policy, pd_run_dir, pd_history):
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16",
                      connector=connector_spec("reference", settings(policy)))
    requests = boundary_workload(spec)
    victim = requests[6]  # 95 tokens: three blocks
    with Deployment(spec, pd_run_dir, f"pause-prefill-{policy}") as deployment:
        expected, decoded, elapsed = pull_from_paused_prefill(deployment, victim, pd_history)
        assert elapsed < DEADLINE_S + 5, f"decode took {elapsed:.1f}s against a {DEADLINE_S}s deadline"
        verdict = judge(expected, decoded, Rule.STRICT, 0.0, decoded.num_cached_tokens, expected_external=0)
        want = Outcome.ERROR if policy == "fail" else Outcome.MATCH
        assert verdict.outcome is want and not decoded.hung, (verdict, decoded)
        result = run_config(deployment, requests[:9], pd_history, drain_s=HOLD_S + 7)
        assert all(c.verdict.outcome is Outcome.MATCH for c in result.requests), [c.verdict for c in result.requests]
        assert result.leaks == ()


def test_a_pull_with_no_deadline_is_caught_hanging_on_the_paused_prefill(pd_run_dir, pd_history, request, monkeypatch):
    from pdcheck.cluster import instance

    monkeypatch.setattr(instance, "REPLY_GRACE_S", 2.0)  # judge the hang in seconds
    reference = connector_spec("reference", settings("fail"))
    mutant = dataclasses.replace(reference, name="pdcheck.mutants.connector:NoPullDeadline")
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=mutant)
    victim = boundary_workload(spec)[6]
    with Deployment(spec, pd_run_dir, "pause-prefill-no-deadline") as deployment:
        expected, decoded, elapsed = pull_from_paused_prefill(deployment, victim, pd_history, deadline_s=4)
    verdict = judge(expected, decoded, Rule.STRICT, 0.0, decoded.num_cached_tokens, expected_external=0)
    assert verdict.outcome is Outcome.HANG, f"{verdict} after {elapsed:.1f}s\n{replay(request)}"


@pytest.mark.slow
def test_decode_paused_between_the_legs_only_delays_the_request(pd_run_dir, pd_history):
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference"))
    request = boundary_workload(spec)[7]
    with Deployment(spec, pd_run_dir, "pause-decode") as deployment:
        prefill, decode = deployment.pair(0)
        expected = deployment.oracle.generate([request], 30)[0]
        prefilled = prefill.generate([prefill_request(request, spec.connector, decode)], 30)[0]
        with Paused(decode, pd_history):
            time.sleep(2)
        decoded = decode.generate([decode_request(request, prefilled, spec.connector)], 30)[0]
        assert decoded.ok and decoded.token_ids == expected.token_ids and decoded.num_cached_tokens == len(request.prompt) - 1
        assert drain(deployment, pd_history, "pause-decode", DRAIN_S)[0] == []

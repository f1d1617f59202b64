"""The served shape: the connector under test inside vLLM's OpenAI server (`pdcheck serve`, one
prefill and one decode instance) behind pdcheck's proxy, beside a served single-instance
oracle. The block-boundary workload goes through the proxy over HTTP, whole and streamed: each
must match the oracle with its KV loaded, and nothing may be held after the drain. What the
in-process classes cannot see shows here: the server's own request handling, the proxy's
join of the legs, and the connector's settings as `vllm serve` passes them."""

from __future__ import annotations

import pytest

from pdcheck.checker.compare import judge
from pdcheck.checker.oracle import Oracle
from pdcheck.client import complete
from pdcheck.conformance.battery import DEADLINE_S, MAX_TOKENS, SEED, Run, drain_s, verdict
from pdcheck.gate import Checked, check, expected_external, leaks
from pdcheck.profiles import FailureClass
from pdcheck.workload.boundary import boundary_workload

FAILURE_CLASS = FailureClass.SERVED


@pytest.fixture(scope="module")
def served(spec, pd_pool, pd_run_dir):
    from pdcheck.cluster.served import ServedCluster

    pd_pool.release()  # three servers of its own: the pool's engines would crowd them out of the cores
    with ServedCluster(spec, pd_run_dir / "served") as cluster:
        yield cluster


@pytest.mark.vllm
def test_through_the_proxy_whole_and_streamed_match(served, spec, pd_history, request):
    requests = boundary_workload(spec, SEED, MAX_TOKENS)
    oracle = Oracle(served.oracle)
    calibration, checked = check(served, requests, pd_history, oracle, deadline_s=DEADLINE_S)
    for sent, expected in zip(requests, oracle.results(requests)):
        streamed = complete(served.proxy.url, spec.model.name, sent, stream=True, timeout_s=DEADLINE_S)
        judged = judge(expected, streamed, calibration.rule, calibration.tolerance, streamed.num_cached_tokens,
                       expected_external(spec, len(sent.prompt)))
        checked.append(Checked(config=f"{spec.label} streamed", prompt_len=len(sent.prompt), verdict=judged,
                               external_tokens=streamed.num_cached_tokens))
    result = Run(checked, leaks(served, pd_history, timeout_s=drain_s(spec), checked=checked))
    assert not verdict(result, request, spec), verdict(result, request, spec)

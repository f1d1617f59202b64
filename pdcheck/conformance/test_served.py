"""The served shape: the connector under test inside vLLM's OpenAI server (`pdcheck serve`, one
prefill and one decode instance) behind pdcheck's proxy, beside a served single-instance
oracle. The block-boundary workload goes through the proxy over HTTP, whole and streamed: each
must match the oracle with its KV loaded, and nothing may be held after the drain. What the
in-process classes cannot see shows here: the server's own request handling, the proxy's
join of the legs, and the connector's settings as `vllm serve` passes them.

API fidelity is judged here too: one request per sampling or output option (n > 1 with a seed,
sampling options, logprobs, prompt logprobs, echo, stop strings and token ids, max_tokens 1,
min_tokens, streaming with usage, chat), whose answer through PD must equal the oracle's field by
field, finish_reason and usage included, with the prompt's KV loaded."""

from __future__ import annotations

import pytest

from pdcheck.checker.api import compare, send
from pdcheck.checker.oracle import Oracle
from pdcheck.conformance.battery import DEADLINE_S, MAX_TOKENS, SEED, Run, drain_s, replay_line, verdict
from pdcheck.gate import Expect, drain, run_config
from pdcheck.profiles import FailureClass
from pdcheck.workload.api import api_cases, case_names, probe
from pdcheck.workload.boundary import boundary_workload

FAILURE_CLASS = FailureClass.SERVED


@pytest.fixture(scope="module")
def served(spec, pd_pool, pd_run_dir):
    from pdcheck.cluster.http_cluster import ServedCluster

    pd_pool.release()  # three servers of its own: the pool's engines would crowd them out of the cores
    with ServedCluster(spec, pd_run_dir / "served") as cluster:
        yield cluster


@pytest.mark.vllm
def test_through_the_proxy_whole_and_streamed_match(served, spec, pd_history, request):
    requests = boundary_workload(spec, SEED, MAX_TOKENS)
    oracle = Oracle(served.oracle)
    whole = run_config(served, requests, pd_history, oracle=oracle, deadline_s=DEADLINE_S, drain_s=drain_s(spec))
    streamed = run_config(served, requests, pd_history, oracle=oracle, client=served.client(stream=True),
                          deadline_s=DEADLINE_S, drain_s=drain_s(spec), config=f"{spec.label} streamed")
    result = Run(whole.requests + streamed.requests, whole.leaks + streamed.leaks)
    assert not verdict(result, request, spec), verdict(result, request, spec)


API_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # logprobs: PD's last prompt token is computed apart


@pytest.fixture(scope="module")
def cases(served, spec):
    greedy = send(served.oracle.url, probe(spec.model.name))
    assert "error" not in greedy, f"the oracle refused the probe: {greedy}"
    return {case.name: case for case in api_cases(spec.model.name, greedy)}


@pytest.mark.vllm
@pytest.mark.parametrize("name", case_names())
def test_api_option_through_pd_equals_the_oracle_field_by_field(name, served, cases, spec, request):
    case = cases[name]
    expected, got = send(served.oracle.url, case), send(served.proxy.url, case)
    failure = compare(case, expected, got, API_TOLERANCE[spec.dtype])[1] or kv_not_loaded(case, got, spec)
    assert not failure, "\n".join([failure, replay_line(request, spec)])


def kv_not_loaded(case, answer: dict, spec) -> str:
    """"" when decode reports the prompt's KV loaded (cached tokens), where it reports them and
    vLLM loads KV for the case at all."""
    usage = answer.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    want = Expect.of(spec).external(usage.get("prompt_tokens", 0))
    if cached is None or cached >= want or not case.loads:
        return ""
    return f"{case.name}: fallback: decode loaded {cached} prompt tokens of the {want} due (usage.prompt_tokens_details)"


@pytest.mark.vllm
def test_nothing_is_held_after_the_api_cases(served, cases, spec, pd_history, request):
    result = Run((), tuple(drain(served, pd_history, "api", drain_s(spec))[0]))
    assert not verdict(result, request, spec), verdict(result, request, spec)

"""The reference connector under the gate: 2P2D over TCP, in every mode, on both models.

Requests go one at a time through the pairs P0>D0, P1>D0, P0>D1, P1>D1 in turn, so each
decode receives from both prefills (2P1D) and each prefill sends to both decodes (1P2D).
Every request must match the oracle, every request longer than one block must have been
loaded through the connector (decode's external-token count and both sides' transfer logs say
how much), and once drained
no instance may hold KV blocks or requests. Negative control: a variant that never frees
prefill's blocks is reported as a leak. Fault: prefill dying before decode pulls ends the
request as an error within the connector's deadline.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from pdcheck.client.legs import decode_request, prefill_request
from pdcheck.cluster.deployment import Deployment
from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.gate import run_config
from pdcheck.report.terminal import failure_line
from pdcheck.types import GenRequest, Outcome
from pdcheck.workload.boundary import boundary_workload

MODELS = ["tiny-llama", "tiny-qwen3-moe"]
MODES = ["get", "put", "put_async"]
# the order pytest runs them in; the push modes on the MoE model only with --runslow (the dense
# model covers the push paths, the MoE model the pull path, in the default gate)
CONFIGS = [(mode, model) for mode in MODES for model in MODELS]
SLOW = {("put", "tiny-qwen3-moe"), ("put_async", "tiny-qwen3-moe")}


def reference_spec(mode: str, model: str) -> EngineSpec:
    return EngineSpec(model=model_path(model), dtype="bfloat16",
                      connector=connector_spec("reference", f'{{"mode": "{mode}"}}'))


@pytest.mark.vllm
@pytest.mark.parametrize("mode, model", [pytest.param(*c, marks=[pytest.mark.slow] * (c in SLOW)) for c in CONFIGS],
                         ids=[f"{mode}-{model}" for mode, model in CONFIGS])
def test_reference_connector_matches_oracle_2p2d(mode, model, pd_pool, pd_history, pytestconfig):
    deployment, oracle = pd_pool.get(reference_spec(mode, model), num_prefill=2, num_decode=2)
    spec = deployment.spec
    following = [c for c in CONFIGS if pytestconfig.getoption("--runslow") or c not in SLOW]
    nxt = following.index((mode, model)) + 1
    if nxt < len(following):
        pd_pool.prefetch(reference_spec(*following[nxt]), num_prefill=2, num_decode=2)
    # a 1-token prompt leaves decode nothing to load: prefill must not pin blocks for it
    requests = boundary_workload(spec) + [GenRequest("r-len1", [5], 16)]
    result = run_config(deployment, requests, pd_history, oracle=oracle)
    checked = result.requests
    failures = [failure_line(c) for c in checked if c.verdict.outcome is not Outcome.MATCH]
    assert not failures, "\n".join(failures)
    for c, r in zip(checked, requests):
        if len(r.prompt) > spec.block_size:
            assert c.external_tokens == len(r.prompt) - 1, f"len {len(r.prompt)}: loaded {c.external_tokens} tokens"
            # both sides move the blocks of all prompt tokens but the last (decode computes that one)
            blocks = -(-(len(r.prompt) - 1) // spec.block_size)
            moved = c.transfer and (c.transfer.saved_blocks, c.transfer.loaded_blocks, c.transfer.errors)
            assert moved == (blocks, blocks, []), f"len {len(r.prompt)}: transfer log {c.transfer}, expected {blocks} blocks"
    assert result.leaks == () and not [c.leak for c in checked if c.leak], f"held after the drain: {result.leaks}"


@pytest.mark.vllm
def test_blocks_never_released_are_reported_as_a_leak(pd_pool, pd_history):
    """Negative control for the drain check: prefill that never frees its blocks is caught, and
    each request it still holds is classed a leak: exactly those whose KV it saved."""
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference"))
    mutant = dataclasses.replace(spec.connector, name="pdcheck.mutants.controls:NeverReleaseConnector")
    leaky = dataclasses.replace(spec, connector=mutant)
    deployment, oracle = pd_pool.get(leaky)
    requests = boundary_workload(spec)[:6]
    result = run_config(deployment, requests, pd_history, oracle=oracle, drain_s=1.0)
    checked, leaked = result.requests, result.leaks
    assert all(c.verdict.outcome is Outcome.MATCH for c in checked)
    assert [name.split(":")[0] for name in leaked] == ["prefill0"], leaked
    saved = [c.prompt_len for c in checked if c.transfer and c.transfer.saved_blocks]
    assert saved and [c.prompt_len for c in checked if c.outcome == "leak"] == saved, [c.leak for c in checked]
    assert all(c.leak == "prefill0 still holds it after the drain" and not c.passed for c in checked if c.leak)


@pytest.mark.vllm
@pytest.mark.parametrize("policy", ["fail", pytest.param("recompute", marks=pytest.mark.slow)])
def test_prefill_dying_before_the_pull_ends_in_time_as_error_or_recompute(policy, pd_run_dir):
    """vLLM's kv_load_failure_policy decides: the request fails, or decode recomputes the
    prompt and still gives the oracle's tokens. Either way within the connector's deadline."""
    settings = f'{{"deadline_s": 2, "kv_load_failure_policy": "{policy}"}}'
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference", settings))
    request = boundary_workload(spec)[5]
    with Deployment(spec, pd_run_dir, f"prefill-dies-{policy}") as deployment:
        prefill, decode = deployment.pair(0)
        prefilled = prefill.generate([prefill_request(request, spec.connector, decode)], 30)[0]
        assert prefilled.ok and prefilled.kv_transfer_params["transfer_key"]
        prefill.process.kill()
        started = time.monotonic()
        decoded = decode.generate([decode_request(request, prefilled, spec.connector)], 30)[0]
        elapsed = time.monotonic() - started
        assert elapsed < 2 + 5, f"took {elapsed:.1f}s against a 2s deadline"
        if policy == "fail":
            assert decoded.error and not decoded.hung, decoded
        else:
            expected = deployment.oracle.generate([request], 30)[0]
            assert decoded.ok and decoded.token_ids == expected.token_ids, (decoded, expected)
        assert decode.drain(5).idle

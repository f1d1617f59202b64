"""Negative controls: deliberately broken decode-side connectors the gate must catch.

Prefill runs the connector as is; decode runs a wrapper from pdcheck.mutants.controls that
damages the KV it loads for one target request (a whole block replaced; one element nudged by
1e-2, visible only in logprobs) or loads nothing at all. The gate must report `diverged` for
exactly the target request, or `fallback` for every request that should have loaded KV.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.config import ConnectorSpec, DecodePrompt, EngineSpec, connector_spec, model_path
from pdcheck.gate import run_config
from pdcheck.known_defects import known_defect
from pdcheck.types import Outcome
from pdcheck.workload.boundary import boundary_workload

TARGET_LEN = 97  # loads three whole blocks; avoids ExampleConnector's known defects


def example_spec() -> EngineSpec:
    return EngineSpec(model=model_path("tiny-llama"), dtype="float32", connector=connector_spec("ExampleConnector"))


def control_spec(spec: EngineSpec, name: str, **extra) -> EngineSpec:
    config = dict(spec.connector.extra_config) | extra
    wrapper = ConnectorSpec(name=f"pdcheck.mutants.controls:{name}", extra_config=tuple(sorted(config.items())),
                            decode_prompt=DecodePrompt.WITH_FIRST_TOKEN)
    return dataclasses.replace(spec, connector=wrapper)


def run_control(pd_pool, pd_history, decode_spec: EngineSpec, spec: EngineSpec):
    deployment, oracle = pd_pool.get(spec, decode_spec=decode_spec)
    return run_config(deployment, boundary_workload(spec), pd_history, oracle=oracle).requests


def judged_apart_from_defects(checked, spec):
    lengths = [c.prompt_len for c in checked]
    return [c for i, c in enumerate(checked)
            if not known_defect(spec.connector.lineage, c.prompt_len, spec.block_size, lengths[:i])]


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["block", "element"])
def test_damaged_kv_block_is_reported_diverged_at_that_request(mode, pd_pool, pd_history):
    spec = example_spec()
    target = next(r for r in boundary_workload(spec) if len(r.prompt) == TARGET_LEN)
    decode = control_spec(spec, "PerturbBlockConnector", target_prefix=target.prompt[:8], mode=mode)
    checked = judged_apart_from_defects(run_control(pd_pool, pd_history, decode, spec), spec)
    outcomes = {c.prompt_len: c.verdict.outcome for c in checked}
    assert outcomes.pop(TARGET_LEN) is Outcome.DIVERGED, f"damaged KV ({mode}) was not caught"
    assert set(outcomes.values()) == {Outcome.MATCH}, f"requests other than the target: {outcomes}"


@pytest.mark.vllm
def test_connector_that_loads_nothing_is_reported_as_fallback(pd_pool, pd_history):
    spec = example_spec()
    checked = run_control(pd_pool, pd_history, control_spec(spec, "LoadNothingConnector"), spec)
    for c in checked:
        expected = Outcome.FALLBACK if c.prompt_len > spec.block_size else Outcome.MATCH
        assert c.verdict.outcome is expected, f"len {c.prompt_len}: {c.verdict}"
        assert c.external_tokens == 0

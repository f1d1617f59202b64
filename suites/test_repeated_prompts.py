"""Repeated identical prompts (vLLM #22965: identical prompts sent repeatedly gave garbage).

The same prompt goes through PD many times, one after another and all at once, with prefix
caching on (so repeats share prefill blocks) and a small KV pool (so freed blocks are reused
at once). Every output must equal the oracle's, with KV loaded for each request; afterwards no
instance may hold blocks. Run against the reference connector (pull, and push from a send
thread: the mode #22965 broke) and against the connector under test. Negative control: keys
made from the prompt (PromptKeys) collide under concurrent repeats and must be caught.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.gate import run_config
from pdcheck.report.terminal import failure_line
from pdcheck.types import Outcome
from pdcheck.workload.boundary import repeated_requests

REPEATS, PROMPT_LEN, MAX_TOKENS = 6, 80, 8
SMALL_POOL = 24  # blocks: a few requests' worth, so blocks are freed and reused constantly


def repeated_spec(spec: EngineSpec) -> EngineSpec:
    return dataclasses.replace(spec, prefix_caching=True, num_blocks=SMALL_POOL)


def run_repeated(pd_pool, pd_history, spec: EngineSpec, concurrency: int):
    deployment, oracle = pd_pool.get(spec)
    requests = repeated_requests(1, PROMPT_LEN, REPEATS, MAX_TOKENS, vocab_size=512)
    result = run_config(deployment, requests, pd_history, oracle=oracle, concurrency=concurrency)
    failures = [failure_line(c) for c in result.requests if c.verdict.outcome is not Outcome.MATCH or c.external_tokens == 0]
    return failures, list(result.leaks)


@pytest.mark.vllm
@pytest.mark.parametrize("concurrency", [1, REPEATS], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("mode", ["get", "put_async"])  # pull, and the send thread of #22965
def test_reference_connector_serves_repeated_prompts_exactly(mode, concurrency, pd_pool, pd_history):
    spec = repeated_spec(EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16",
                                    connector=connector_spec("reference", f'{{"mode": "{mode}"}}')))
    failures, leaked = run_repeated(pd_pool, pd_history, spec, concurrency)
    assert not failures, "\n".join(failures)
    assert not leaked, leaked


@pytest.mark.vllm
def test_transfer_keys_made_from_the_prompt_are_caught_under_concurrent_repeats(pd_pool, pd_history):
    """Negative control: PromptKeys (identical prompts share a transfer key) must fail this suite."""
    spec = repeated_spec(EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16",
                                    connector=connector_spec("reference", '{"deadline_s": 2}')))
    mutant = dataclasses.replace(spec.connector, name="pdcheck.mutants.connector:PromptKeys")
    failures, leaked = run_repeated(pd_pool, pd_history, dataclasses.replace(spec, connector=mutant), REPEATS)
    assert failures or leaked, "identical prompts sharing a key went unnoticed"

"""The reference connector under the gate: 2P2D over TCP, in every mode, on both models.

Requests go one at a time through the pairs P0>D0, P1>D0, P0>D1, P1>D1 in turn, so each
decode receives from both prefills (2P1D) and each prefill sends to both decodes (1P2D).
Every request must match the oracle, and every request longer than one block must have been
loaded through the connector (decode's external-token count says how much).
"""

from __future__ import annotations

import pytest

from pdcheck.checker.compare import Outcome
from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.gate import check
from pdcheck.report import failure_line
from pdcheck.workload.boundary import boundary_workload

MODELS = ["tiny-llama", "tiny-qwen3-moe"]
MODES = ["get", "put", "put_async"]


@pytest.mark.vllm
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_reference_connector_matches_oracle_2p2d(mode, model, pd_pool, pd_history):
    spec = EngineSpec(model=model_path(model), dtype="bfloat16",
                      connector=connector_spec("reference", f'{{"mode": "{mode}"}}'))
    deployment, oracle = pd_pool.get(spec, num_prefill=2, num_decode=2)
    requests = boundary_workload(spec)
    _, checked = check(deployment, requests, pd_history, oracle)
    failures = [failure_line(c) for c in checked if c.verdict.outcome is not Outcome.MATCH]
    assert not failures, "\n".join(failures)
    for c, r in zip(checked, requests):
        if len(r.prompt) > spec.block_size:
            assert c.external_tokens == len(r.prompt) - 1, f"len {len(r.prompt)}: loaded {c.external_tokens} tokens"

"""The MoE model's routing variants through the connector under test (pdcheck/moe/variants.py,
made from the embedded tiny-qwen3-moe): every token to one expert, and top-k 8 (every expert),
in the slow tier also top-k 1 with the base's router. Prompts sit just below, at and just
above the 8-row tiles of vLLM's CPU MoE kernel and the 32-token KV blocks (suites/
test_moe_routing.py says why these are the edges, and checks the one-expert routing itself).
Every request must match the oracle with its KV loaded, and nothing may be held after."""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.conformance.battery import MAX_TOKENS, SEED, run, verdict
from pdcheck.moe.variants import VARIANTS, make_variant
from pdcheck.profiles import FailureClass
from pdcheck.workload.boundary import boundary_workload

FAILURE_CLASS = FailureClass.MOE
EDGE_LENGTHS = [31, 32, 33, 63, 64, 65]


@pytest.mark.vllm
@pytest.mark.parametrize("variant", ["one-expert", "top8", pytest.param("top1", marks=pytest.mark.slow)])
def test_routing_variant_matches_at_tile_and_block_edges(variant, spec, pd_pool, pd_history, pd_run_dir, request):
    moe = dataclasses.replace(spec, model=make_variant(VARIANTS[variant], pd_run_dir / "models"))
    requests = [r for r in boundary_workload(moe, SEED, MAX_TOKENS) if len(r.prompt) in EDGE_LENGTHS]
    result = run(pd_pool, pd_history, moe, requests)
    assert not verdict(result, request, spec), verdict(result, request, spec)

"""MoE routing edges: the routing variants of tiny-qwen3-moe that the battery's `moe` class
(pdcheck/conformance/test_moe.py) runs through the connector under test, checked here to route
as they claim, and a negative control on them.

Variants (pdcheck/moe/variants.py, made from the base model at test time): every token to one
expert (top-k 1 and a constructed router, see there), top-k 1 with the base's random router,
and top-k 8 = every expert. The one-expert construction is checked on real hidden states with
vLLM's own CPU router, and the same check must fail on the random router.

The edges. vLLM 0.32's CPU MoE path does not chunk (VLLM_FUSED_MOE_CHUNK_SIZE is read nowhere,
pdcheck/moe/__init__.py), so tokens x top-k meets no chunk edge. The edges this path has:
- per-expert row tiles of 8 (MaxMSize of the "vec" micro-GEMM; 32 with AMX, absent here), the
  last tile of each expert partial. With one expert, and with top-k 8, each expert in use gets
  one row per prompt token, so a prompt of n tokens gives it n rows: n = 8m-1, 8m, 8m+1 is just
  below, at and just above a tile edge. Prefill and the oracle compute the prompt's last token
  as that expert's row n-1 (7th row of a partial tile, last row of a full tile, alone in a new
  tile); PD's decode recomputes it alone (one row, one tile). A row whose result depends on
  where it sits in its tile shows as PD differing from the oracle.
- KV blocks of 32 tokens, where the connector cuts whole and partial blocks: n = 32m-1, 32m,
  32m+1.
Every block edge is a tile edge too (8 and 32 divide 32), so the prompts are the block-boundary
workload's own, which `pdcheck run --lengths` replays: 31, 32, 33, 63, 64, 65, and in the slow
tier also 127, 128, 129. Top-k 1 with the random router puts n rows in all, split as it routes.

Negative control: CorruptOnLoad (pdcheck/mutants/connector.py) on the one-expert variant must be
reported as diverged.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.config import DTYPES, REFERENCE, EngineSpec, connector_spec
from pdcheck.gate import run_config
from pdcheck.moe.variants import ONE_EXPERT, VARIANTS, make_variant, routed_experts
from pdcheck.repro.command import replay_command
from pdcheck.types import Outcome
from pdcheck.workload.boundary import boundary_workload

SEED, MAX_TOKENS = 0, 16
EDGE_LENGTHS = [31, 32, 33, 63, 64, 65]
SLOW_LENGTHS = EDGE_LENGTHS + [127, 128, 129]
CORRUPT = "pdcheck.mutants.connector:CorruptOnLoad"


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    """Every variant's model folder, made once for the module."""
    out = tmp_path_factory.mktemp("moe-variants")
    for variant in VARIANTS.values():
        make_variant(variant, out)
    return out


def variant_spec(variant_dir, name: str, connector: str = REFERENCE) -> EngineSpec:
    """bfloat16, the reference connector's settings, and `connector` as the class."""
    reference = connector_spec("reference")
    return EngineSpec(model=(variant_dir / f"tiny-qwen3-moe-{name}").resolve(), dtype="bfloat16",
                      connector=dataclasses.replace(reference, name=connector))


def requests_at(spec: EngineSpec, lengths: list[int]):
    return [r for r in boundary_workload(spec, SEED, MAX_TOKENS) if len(r.prompt) in lengths]


def replay(spec: EngineSpec, name: str, lengths: list[int]) -> str:
    """Remake the variant where it was, then rerun the requests up to the failing one."""
    make = f"python -m pdcheck.moe.variants {name} {spec.model.parent}"
    return f"replay: {make} && {replay_command(spec, SEED, MAX_TOKENS, lengths)}"


def not_one_expert(counts) -> list[str]:
    """Layers whose rows went anywhere but ONE_EXPERT, with where they went."""
    return [f"layer {i}: {dict(c)}" for i, c in enumerate(counts) if set(c) != {ONE_EXPERT}]


@pytest.mark.vllm
def test_one_expert_variant_routes_every_token_to_that_expert(variant_dir, pd_pool):
    one_expert = variant_spec(variant_dir, "one-expert")
    pd_pool.prefetch(one_expert)  # the next test's deployment starts while this one runs
    prompts = [r.prompt for r in requests_at(one_expert, SLOW_LENGTHS)]
    for dtype in DTYPES:
        assert not_one_expert(routed_experts(one_expert.model, prompts, dtype)) == [], dtype
    # the same check on top-k 1 with the base router must fail, or it could not tell
    spread = not_one_expert(routed_experts(variant_spec(variant_dir, "top1").model, prompts, "bfloat16"))
    assert len(spread) == 2, spread


@pytest.mark.vllm
def test_kv_corrupted_on_load_at_routing_edges_is_caught(variant_dir, pd_pool, pd_history):
    spec = variant_spec(variant_dir, "one-expert", CORRUPT)
    deployment, oracle = pd_pool.get(spec)
    checked = run_config(deployment, requests_at(spec, EDGE_LENGTHS), pd_history, oracle=oracle).requests
    seen = ", ".join(f"len {c.prompt_len} {c.verdict.outcome.value}" for c in checked)
    # every request loads KV, so every one gets a noise block
    assert all(c.verdict.outcome is Outcome.DIVERGED for c in checked), \
        f"CorruptOnLoad not caught on the one-expert variant: {seen}\n{replay(spec, 'one-expert', EDGE_LENGTHS)}"

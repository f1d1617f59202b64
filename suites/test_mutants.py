"""Known bug classes re-created as mutants (pdcheck/mutants/): the gate must catch each one.

The correct code passes the same checks elsewhere (test_layouts, test_reference_connector),
so a catch here is the mutant's doing, not a broken harness.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from pdcheck.checker.compare import Outcome, Rule, judge  # noqa: E402
from pdcheck.config import EngineSpec, connector_spec, model_path  # noqa: E402
from pdcheck.connector.layouts import KVLayout, extract  # noqa: E402
from pdcheck.mutants.layouts import guessed_extract, slot_reshape_extract  # noqa: E402
from pdcheck.workload.boundary import boundary_workload  # noqa: E402


def cache(layout: KVLayout, blocks: int) -> torch.Tensor:
    shape = (2, blocks, 4, 2, 8) if layout is KVLayout.FLASH_ATTN else (blocks, 2, 4, 2, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(blocks))


def test_layout_guessed_from_shape_misreads_a_two_block_flash_attention_cache():
    fa = cache(KVLayout.FLASH_ATTN, 2)
    assert torch.equal(guessed_extract(cache(KVLayout.FLASH_ATTN, 3), [1]), extract(cache(KVLayout.FLASH_ATTN, 3),
                                                                                   KVLayout.FLASH_ATTN, [1]))
    assert not torch.equal(guessed_extract(fa, [1]), extract(fa, KVLayout.FLASH_ATTN, [1]))


def test_flash_infer_read_through_a_flash_attention_slot_view_is_caught():
    fi = cache(KVLayout.FLASH_INFER, 3)
    assert not torch.equal(slot_reshape_extract(fi, [0, 2]), extract(fi, KVLayout.FLASH_INFER, [0, 2]))


def mutant_spec(name: str, settings: str = "{}") -> EngineSpec:
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference", settings))
    return dataclasses.replace(spec, connector=dataclasses.replace(spec.connector, name=f"pdcheck.mutants.connector:{name}"))


@pytest.mark.vllm
def test_engine_local_transfer_keys_are_caught_as_errors(pd_pool, pd_history):
    from pdcheck.gate import check

    spec = mutant_spec("EngineLocalKeys", '{"deadline_s": 2}')
    deployment, oracle = pd_pool.get(spec)
    requests = [r for r in boundary_workload(spec) if len(r.prompt) in (33, 65)]
    _, checked = check(deployment, requests, pd_history, oracle)
    assert [c.verdict.outcome for c in checked] == [Outcome.ERROR, Outcome.ERROR], [c.verdict for c in checked]


@pytest.mark.vllm
def test_missing_kv_skipped_silently_is_caught_as_divergence(pd_run_dir):
    """Prefill dies before decode pulls: the reference fails the request; this mutant decodes
    on blocks that were never loaded, and the oracle comparison shows it."""
    from pdcheck.cluster.deployment import Deployment
    from pdcheck.pd import decode_request, prefill_request

    spec = mutant_spec("SkipMissingKV", '{"deadline_s": 2}')
    request = next(r for r in boundary_workload(spec) if len(r.prompt) == 97)
    with Deployment(spec, pd_run_dir, "skip-missing") as deployment:
        prefill, decode = deployment.pair(0)
        expected = deployment.oracle.generate([request], 30)[0]
        prefilled = prefill.generate([prefill_request(request, spec.connector, decode)], 30)[0]
        prefill.process.kill()
        decoded = decode.generate([decode_request(request, prefilled, spec.connector)], 30)[0]
    verdict = judge(expected, decoded, Rule.STRICT, 0.0, decoded.num_cached_tokens, expects_transfer=True)
    assert verdict.outcome is Outcome.DIVERGED, verdict

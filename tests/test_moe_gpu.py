"""MoE shapes on the GPU: pdcheck's chunked MoE run on CUDA against the float64 reference at the
chunk boundaries, and its chunk-slicing mutant caught there too. The GPU tier reruns this file
under compute-sanitizer memcheck (scripts/gpu_tier.sh, PDCHECK_SANITIZER_TESTS), which must
report nothing: the buffers are sliced, never read past their storage.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
from pdcheck.moe.cases import MoECase, compare  # noqa: E402

pytestmark = pytest.mark.gpu
CHUNKED = "pdcheck.moe.chunked:ChunkedMoE"
MUTANT = "pdcheck.mutants.moe:TokensSlicedRemainder"


def boundary_cases(dtype: str) -> list[MoECase]:
    """Chunks of 16 rows: tokens x top_k just below, at and above multiples of it, top_k 1 to 8
    of 8 experts, some experts never routed to, hidden sizes that are not multiples of 16."""
    cases = []
    for top_k in (1, 2, 3, 8):
        per_chunk = max(1, 16 // top_k)
        for tokens in sorted({per_chunk - 1, per_chunk, per_chunk + 1, 2 * per_chunk + 1, 3 * per_chunk - 1} - {0}):
            cases.append(MoECase(num_tokens=tokens, hidden=40 + top_k, intermediate=24, num_experts=8, top_k=top_k,
                                 num_routed=max(top_k, 5), chunk_size=16, dtype=dtype, seed=tokens))
    return cases


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_moe_on_cuda_matches_the_float64_reference_at_chunk_boundaries(dtype):
    failures = [m.report() for case in boundary_cases(dtype) if (m := compare(CHUNKED, case, "cuda"))]
    assert not failures, "\n".join(failures)


def test_the_remainder_sliced_by_tokens_is_caught_on_cuda():
    caught = [case for case in boundary_cases("float32") if compare(MUTANT, case, "cuda")]
    triggering = [c for c in boundary_cases("float32") if c.top_k > 1 and c.num_tokens > 16 // c.top_k
                  and c.num_tokens % (16 // c.top_k)]
    assert caught and set(caught) >= set(triggering), f"caught {caught}, expected at least {triggering}"

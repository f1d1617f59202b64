"""MoE shapes: chunked and fused MoE against a float64 reference at chunk and tile boundaries.

Guards the "MoE chunk remainder" class of BUGS.md (vLLM #13693): the last, partial chunk sliced
by tokens instead of tokens x top_k. Hypothesis draws seeded shapes: token counts whose
tokens x top_k lands just below, at or just above a multiple of a small chunk (8 to 64 rows),
top_k from 1 to the expert count, experts that get no tokens, hidden sizes that are not
multiples of 16 (multiples of 32 for vLLM's op, which refuses others), float32 and bfloat16.

Under test: pdcheck's ChunkedMoE, and vLLM's CPU fused-MoE op called on tensors (what
CPUUnquantizedExperts runs; it does not chunk by a chunk size, pdcheck/moe/__init__.py says how
it splits the work). The negative control, pdcheck.mutants.moe:TokensSlicedRemainder, must be
caught by the same search, with a replay line that reproduces the failure. Tolerances and how
they were picked: pdcheck/moe/cases.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pdcheck.moe.cases import MoECase, assert_matches_reference, compare  # noqa: E402

CHUNKED = "pdcheck.moe.chunked:ChunkedMoE"
VLLM_CPU = "pdcheck.moe.vllm_cpu:VllmCpuMoE"
MUTANT = "pdcheck.mutants.moe:TokensSlicedRemainder"
ROOT = Path(__file__).resolve().parents[1]

UNALIGNED_HIDDEN = st.integers(1, 100).filter(lambda hidden: hidden % 16 != 0)
VLLM_HIDDEN = st.sampled_from([32, 64, 96, 160])


@st.composite
def moe_cases(draw, hidden_sizes) -> MoECase:
    num_experts = draw(st.integers(2, 8))
    top_k = draw(st.sampled_from([2, num_experts]) | st.integers(1, num_experts))
    chunk_size = draw(st.sampled_from([8, 12, 16, 24, 32, 64]))
    chunk_tokens = max(1, chunk_size // top_k)
    offset = draw(st.sampled_from([-1, 0, 1]) | st.integers(-chunk_tokens, chunk_tokens))
    num_tokens = max(1, draw(st.integers(0, 3)) * chunk_tokens + offset)
    return MoECase(num_tokens=num_tokens, hidden=draw(hidden_sizes), intermediate=draw(st.integers(1, 72)),
                   num_experts=num_experts, top_k=top_k, num_routed=draw(st.integers(top_k, num_experts)),
                   chunk_size=chunk_size, dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                   renormalize=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def search(target: str, hidden_sizes, max_examples: int) -> None:
    """Hypothesis over seeded shapes; fails with the minimal mismatch's report and replay line."""

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])
    @given(case=moe_cases(hidden_sizes))
    def matches_reference(case):
        assert_matches_reference(target, case)

    matches_reference()


def test_chunked_moe_matches_reference_across_chunk_boundaries():
    search(CHUNKED, UNALIGNED_HIDDEN, max_examples=150)


@pytest.mark.vllm
def test_vllm_cpu_moe_matches_reference_across_tile_boundaries():
    search(VLLM_CPU, VLLM_HIDDEN, max_examples=100)


@pytest.mark.vllm
def test_vllm_cpu_moe_refuses_hidden_size_not_multiple_of_32_loudly():
    case = MoECase(num_tokens=5, hidden=48, intermediate=32, num_experts=4, top_k=2, num_routed=4,
                   chunk_size=8, dtype="float32")
    with pytest.raises(RuntimeError, match="% 32"):
        compare(VLLM_CPU, case)


@pytest.mark.vllm
def test_fused_moe_chunk_size_env_is_not_a_knob_of_this_vllm():
    from vllm import envs

    assert "VLLM_FUSED_MOE_CHUNK_SIZE" not in envs.environment_variables, (
        "this vLLM reads VLLM_FUSED_MOE_CHUNK_SIZE again: update pdcheck/moe/__init__.py and drive "
        "the vLLM MoE test through it")


def replay_lines(message: str) -> list[str]:
    lines = (line.strip() for line in message.splitlines())
    return [line.removeprefix("replay: ") for line in lines if line.startswith("replay: ")]


def test_mutant_remainder_sliced_by_tokens_is_caught_with_a_replay_line():
    with pytest.raises(AssertionError) as caught:
        search(MUTANT, UNALIGNED_HIDDEN, max_examples=60)
    report = str(caught.value)
    assert f"{MUTANT} differs from the float64 reference" in report, report
    [line] = replay_lines(report)
    _python, *args = shlex.split(line)
    replayed = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert replayed.returncode != 0 and "differs from the float64 reference" in replayed.stderr, (
        f"the replay line did not reproduce the failure:\n{line}\n{replayed.stdout}{replayed.stderr}")


# chunk_size 16 and top_k 2 make chunks of 8 tokens (16 rows).
@pytest.mark.parametrize("num_tokens, top_k, is_remainder", [
    (9, 2, True),  # 18 rows: one full chunk and a 1-token remainder
    (23, 2, True),  # 46 rows: two full chunks and a 7-token remainder
    (8, 2, False),  # 16 rows: exactly one chunk
    (16, 2, False),  # 32 rows: exactly two chunks
    (7, 2, False),  # 14 rows: a single partial chunk, nothing before it
    (17, 1, False),  # top_k 1: tokens and rows are the same number
])
def test_mutant_is_caught_exactly_when_a_remainder_follows_a_full_chunk(num_tokens, top_k, is_remainder):
    case = MoECase(num_tokens=num_tokens, hidden=40, intermediate=24, num_experts=4, top_k=top_k,
                   num_routed=3, chunk_size=16, dtype="bfloat16", seed=num_tokens)
    assert_matches_reference(CHUNKED, case)
    caught = compare(MUTANT, case)
    assert (caught is not None) == is_remainder, caught.report() if caught else f"{MUTANT} escaped at {case}"

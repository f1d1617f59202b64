"""The checker's outcome classes and rules, on hand-made results (no vLLM)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pdcheck.checker.compare import Outcome, Rule, first_divergence, judge
from pdcheck.cluster.messages import GenResult


def result(tokens, logprobs=None, top=None, **kw) -> GenResult:
    logprobs = logprobs if logprobs is not None else [-1.0] * len(tokens)
    top = top if top is not None else [{t: lp} for t, lp in zip(tokens, logprobs)]
    return GenResult(request_id="r", token_ids=list(tokens), logprobs=list(logprobs), top_logprobs=top, **kw)


def strict(oracle, pd, external=32, expects=True):
    return judge(oracle, pd, Rule.STRICT, 0.0, external, expects)


def test_identical_output_with_transfer_is_a_match():
    assert strict(result([1, 2, 3]), result([1, 2, 3])).outcome is Outcome.MATCH


def test_different_token_is_diverged_with_position_and_windows():
    v = strict(result([1, 2, 3, 4]), result([1, 2, 9, 9]))
    assert (v.outcome, v.position, v.expected[-2:], v.actual[-2:]) == (Outcome.DIVERGED, 2, [3, 4], [9, 9])


def test_strict_rule_catches_a_tiny_logprob_difference():
    v = strict(result([1, 2], [-1.0, -2.0]), result([1, 2], [-1.0, -2.0 + 1e-7]))
    assert v.outcome is Outcome.DIVERGED and v.position == 1


def test_tolerant_rule_accepts_difference_within_tolerance_only():
    oracle, pd = result([1, 2], [-1.0, -2.0]), result([1, 2], [-1.0, -2.0 + 1e-7])
    assert judge(oracle, pd, Rule.TOLERANT, 1e-6, 32, True).outcome is Outcome.MATCH
    assert judge(oracle, pd, Rule.TOLERANT, 1e-8, 32, True).outcome is Outcome.DIVERGED


def test_tolerant_rule_accepts_a_near_tie_only_inside_both_top_k():
    top = [{1: -1.0}, {2: -0.7, 5: -0.71}]
    oracle, pd = result([1, 2], [-1.0, -0.7], top), result([1, 5], [-1.0, -0.71], top)
    assert judge(oracle, pd, Rule.TOLERANT, 1e-6, 32, True).outcome is Outcome.MATCH
    assert strict(oracle, pd).outcome is Outcome.DIVERGED
    far = result([1, 7], [-1.0, -3.0], [{1: -1.0}, {7: -3.0}])
    assert judge(oracle, far, Rule.TOLERANT, 1e-6, 32, True).outcome is Outcome.DIVERGED


def test_match_without_external_kv_is_a_fallback_only_when_a_transfer_was_due():
    assert strict(result([1]), result([1]), external=0).outcome is Outcome.FALLBACK
    assert strict(result([1]), result([1]), external=0, expects=False).outcome is Outcome.MATCH


def test_hang_and_error_are_classed_before_tokens():
    assert strict(result([1]), GenResult(request_id="r", hung=True)).outcome is Outcome.HANG
    assert strict(result([1]), GenResult(request_id="r", error="boom")).outcome is Outcome.ERROR


def test_shorter_output_diverges_where_it_ends():
    v = strict(result([1, 2, 3]), result([1, 2]))
    assert v.outcome is Outcome.DIVERGED and v.position == 2


@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_first_divergence_is_the_first_unequal_position(a, b):
    i = first_divergence(a, b)
    if i is None:
        assert a == b
    else:
        assert a[:i] == b[:i] and (i == min(len(a), len(b)) or a[i] != b[i])

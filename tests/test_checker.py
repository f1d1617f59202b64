"""The checker's outcome classes and rules, on hand-made results (no vLLM)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from pdcheck.checker.compare import first_divergence, judge
from pdcheck.checker.oracle import Oracle
from pdcheck.config import ConnectorSpec, EngineSpec
from pdcheck.gate import Expect, judge_one
from pdcheck.known_defects import known_defect
from pdcheck.profiles import BUILTIN, EXAMPLE_CLASS, Profile
from pdcheck.report.terminal import print_summary
from pdcheck.types import Calibration, Checked, ConfigResult, GenRequest, GenResult, Outcome, PDResult, Rule

STRICT = Calibration(Rule.STRICT, 0.0, 0.0, "stable")
TOLERANT = Calibration(Rule.TOLERANT, 1e-6, 1e-7, "unstable")
EXAMPLE_LINEAGE = ("mine.SubclassedExample", EXAMPLE_CLASS, "builtins.object")


def result(tokens, logprobs=None, top=None, **kw) -> GenResult:
    logprobs = logprobs if logprobs is not None else [-1.0] * len(tokens)
    top = top if top is not None else [{t: lp} for t, lp in zip(tokens, logprobs)]
    return GenResult(request_id="r", token_ids=list(tokens), logprobs=list(logprobs), top_logprobs=top, **kw)


def strict(oracle, pd, external=32, expected=32):
    return judge(oracle, pd, Rule.STRICT, 0.0, external, expected)


def engine(profile: Profile = Profile(), lineage: tuple[str, ...] = ()) -> EngineSpec:
    return EngineSpec(Path("tiny-llama"), block_size=32,
                      connector=ConnectorSpec("Any", profile=profile, lineage=lineage))


def judged(spec, prompt_len, pd: GenResult, external, expected=None, earlier=(), calibration=STRICT, oracle=None):
    request = GenRequest("r", list(range(prompt_len)), len(pd.token_ids) or 16)
    return judge_one(Expect.of(spec), request, PDResult(pd, external, GenResult("r")), expected or result(pd.token_ids),
                     calibration, list(earlier), oracle=oracle, config=spec.label)


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
    assert judge(oracle, pd, Rule.TOLERANT, 1e-6, 32, 32).outcome is Outcome.MATCH
    assert judge(oracle, pd, Rule.TOLERANT, 1e-8, 32, 32).outcome is Outcome.DIVERGED


def test_tolerant_rule_accepts_a_near_tie_only_inside_both_top_k():
    top = [{1: -1.0}, {2: -0.7, 5: -0.71}]
    oracle, pd = result([1, 2], [-1.0, -0.7], top), result([1, 5], [-1.0, -0.71], top)
    tie = judge(oracle, pd, Rule.TOLERANT, 1e-6, 32, 32)
    assert (tie.outcome, tie.tie_at) == (Outcome.MATCH, 1)
    assert strict(oracle, pd).outcome is Outcome.DIVERGED
    far = result([1, 7], [-1.0, -3.0], [{1: -1.0}, {7: -3.0}])
    assert judge(oracle, far, Rule.TOLERANT, 1e-6, 32, 32).outcome is Outcome.DIVERGED


def test_match_without_external_kv_is_a_fallback_only_when_a_transfer_was_due():
    assert strict(result([1]), result([1]), external=0).outcome is Outcome.FALLBACK
    assert strict(result([1]), result([1]), external=0, expected=0).outcome is Outcome.MATCH


def test_match_loading_fewer_prompt_tokens_than_expected_is_partial():
    v = strict(result([1]), result([1]), external=16, expected=32)
    assert v.outcome is Outcome.PARTIAL and "loaded 16 of 32" in v.detail
    assert strict(result([1]), result([1]), external=32, expected=32).outcome is Outcome.MATCH
    assert strict(result([1, 2]), result([1, 9]), external=16, expected=32).outcome is Outcome.DIVERGED


@pytest.mark.parametrize("faulted", [False, True])
def test_partial_transfer_never_passes(faulted):
    v = strict(result([1]), result([1]), external=16, expected=32)
    assert not Checked("c", 33, v, 16, counted="partial", faulted=faulted).passed


def test_judge_one_expects_the_profiles_token_count_beyond_one_block():
    """The reference's profile expects L-1 tokens, ExampleConnector's whole blocks."""
    out = result(range(16))
    assert judged(engine(), 65, out, 63).verdict.outcome is Outcome.PARTIAL  # expects 64
    assert judged(engine(), 65, out, 64).verdict.outcome is Outcome.MATCH
    assert judged(engine(BUILTIN[EXAMPLE_CLASS]), 65, out, 64).verdict.outcome is Outcome.MATCH  # expects 64
    assert judged(engine(BUILTIN[EXAMPLE_CLASS]), 95, out, 32).verdict.outcome is Outcome.PARTIAL
    assert judged(engine(), 32, out, 0).verdict.outcome is Outcome.MATCH  # one block: no transfer due
    assert judged(engine(), 33, out, 0).verdict.outcome is Outcome.FALLBACK


def test_summary_counts_partial_requests_in_their_own_column():
    v = strict(result([1]), result([1]), external=16, expected=32)
    config = ConfigResult("tiny-llama/float32", STRICT, (Checked("tiny-llama/float32", 65, v, 16, counted="partial"),))
    out = io.StringIO()
    print_summary(Console(file=out, width=200), [config])
    head, row = [line for line in out.getvalue().splitlines() if "partial" in line or "tiny-llama" in line]
    cells = [c.strip() for c in row.split("│")]
    assert cells[[c.strip() for c in head.split("┃")].index("partial")] == "1"


def test_hang_and_error_are_classed_before_tokens():
    assert strict(result([1]), GenResult(request_id="r", hung=True)).outcome is Outcome.HANG
    assert strict(result([1]), GenResult(request_id="r", error="boom")).outcome is Outcome.ERROR


def test_shorter_output_diverges_where_it_ends():
    v = strict(result([1, 2, 3]), result([1, 2]))
    assert v.outcome is Outcome.DIVERGED and v.position == 2


class ScriptedInstance:
    """An oracle engine whose output for each prompt is given; counts what it was asked."""

    def __init__(self, outputs: dict[tuple, GenResult]):
        self.outputs, self.asked = outputs, []

    def generate(self, requests, deadline_s):
        self.asked += [(tuple(r.prompt), r.max_tokens) for r in requests]
        return [self.outputs[tuple(r.prompt), r.max_tokens] for r in requests]


TIE = [{1: -1.0}, {2: -0.7, 5: -0.71}, {6: -0.5, 3: -0.6}, {7: -0.5, 8: -0.6}]


def test_oracle_continuation_generates_after_the_forced_tokens_once():
    after = result([6, 7])
    instance = ScriptedInstance({((0, 1, 1, 5), 2): after})
    oracle = Oracle(instance)
    request = GenRequest("r", [0, 1], 4)
    assert oracle.continuation(request, [1, 5]) == oracle.continuation(request, [1, 5]) == after
    assert instance.asked == [((0, 1, 1, 5), 2)]


def test_divergence_after_an_accepted_near_tie_is_diverged_at_its_whole_output_position():
    """Oracle 1 2 3 7, PD 1 5 6 9: the tie at 1 is accepted; from PD's 1 5 the oracle goes on 6 8."""
    expected = result([1, 2, 3, 7], [-1.0, -0.7, -0.5, -0.5], TIE)
    pd = result([1, 5, 6, 9], [-1.0, -0.71, -0.5, -0.5], [TIE[0], TIE[1], {6: -0.5}, {9: -0.5}])
    oracle = Oracle(ScriptedInstance({((0, 1, 1, 5), 2): result([6, 8], [-0.5, -0.5])}))
    v = judged(engine(), 2, pd, 0, expected, calibration=TOLERANT, oracle=oracle).verdict
    assert (v.outcome, v.position) == (Outcome.DIVERGED, 3)
    assert (v.expected, v.actual) == ([1, 5, 6, 8], [1, 5, 6, 9]) and "near-tie at token 1" in v.detail


def test_output_past_near_ties_matching_the_continuations_is_a_match_noting_each_tie():
    expected = result([1, 2, 3, 7], [-1.0, -0.7, -0.5, -0.5], TIE)
    pd = result([1, 5, 6, 8], [-1.0, -0.71, -0.5, -0.6], [TIE[0], TIE[1], {6: -0.5}, {8: -0.6, 9: -0.61}])
    after = result([6, 9], [-0.5, -0.61], [{6: -0.5}, {9: -0.61, 8: -0.6}])
    oracle = Oracle(ScriptedInstance({((0, 1, 1, 5), 2): after}))
    v = judged(engine(), 2, pd, 0, expected, calibration=TOLERANT, oracle=oracle).verdict
    assert (v.outcome, v.tie_at) == (Outcome.MATCH, 3)
    assert v.detail == "accepted near-tie at token 1, then at token 3"


@pytest.mark.parametrize("rule", list(Rule))
@pytest.mark.parametrize("pd, problem", [
    (result([1, 2], [-1.0]), "1 logprobs for 2 tokens"),
    (result([1, 2], [-1.0, float("nan")]), "logprob of token 1 is nan"),
    (result([1, 2], [-1.0, float("-inf")]), "logprob of token 1 is -inf"),
    (result([1, 2], top=[{1: -1.0}]), "no top logprobs for token 1"),
    (result([1, 2], top=[{1: -1.0}, {}]), "no top logprobs for token 1"),
])
def test_malformed_pd_logprobs_are_diverged_naming_the_problem(rule, pd, problem):
    v = judge(result([1, 2]), pd, rule, 1.0, 32, 32)
    assert v.outcome is Outcome.DIVERGED and problem in v.detail and v.position == 1


def test_both_failing_is_a_match_only_when_the_errors_agree_up_to_ids():
    def failed(rid, error):
        return GenResult(request_id=rid, error=error)

    same = judge(failed("r-1", "ValueError: request r-1 (cmpl-4f9c2a1e-77b0-4c1a-9d3e-1a2b3c4d5e6f) is too long"),
                 failed("r-1", "ValueError: request r-1 (cmpl-0a1b2c3d-0000-4aaa-8bbb-abcdefabcdef) is too long"),
                 Rule.STRICT, 0.0, 0, 0)
    assert same.outcome is Outcome.MATCH
    other = judge(failed("r-1", "ValueError: prompt too long"), failed("r-1", "FileNotFoundError: kv/abc"),
                  Rule.STRICT, 0.0, 0, 0)
    assert other.outcome is Outcome.ERROR
    assert "ValueError: prompt too long" in other.detail and "FileNotFoundError: kv/abc" in other.detail


def test_known_defects_follow_the_resolved_class_not_the_name_typed():
    assert known_defect(EXAMPLE_LINEAGE, 64, 32, []).name == "example-connector-block-multiple"
    assert known_defect(("ExampleConnector",), 64, 32, []) is None
    assert known_defect(("pdcheck.connector.plugin.P2PConnector",), 64, 32, []) is None


@pytest.mark.parametrize("error, counted", [
    ("engine step failed: FileNotFoundError: [Errno 2] kv/ab12.safetensors", "known"),
    ("engine step failed: ConnectionError: peer gone", "error"),
])
def test_a_known_defect_counts_only_with_its_recorded_symptom(error, counted):
    spec = engine(BUILTIN[EXAMPLE_CLASS], EXAMPLE_LINEAGE)
    item = judged(spec, 64, GenResult("r", error=error), 0, result(range(16)))
    assert (item.known_defect, item.counted, item.passed) == (
        "example-connector-block-multiple", counted, counted == "known")


def test_a_skipped_save_is_known_as_a_fallback_never_as_a_partial_load():
    spec = engine(BUILTIN[EXAMPLE_CLASS], EXAMPLE_LINEAGE)
    assert judged(spec, 33, result(range(16)), 0, earlier=[31]).counted == "known"
    partial = judged(spec, 33, result(range(16)), 16, earlier=[31])
    assert (partial.counted, partial.passed) == ("partial", False)


@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_first_divergence_is_the_first_unequal_position(a, b):
    i = first_divergence(a, b)
    if i is None:
        assert a == b
    else:
        assert a[:i] == b[:i] and (i == min(len(a), len(b)) or a[i] != b[i])

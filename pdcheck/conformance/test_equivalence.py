"""Block-boundary equivalence, both models and both dtypes: every request of the block-boundary
workload (prompt lengths b-1, b, b+1, 2b-1, ...) through PD gives the oracle's tokens and
logprobs, with the KV the profile expects really loaded (else `fallback` or `partial`).
Defects recorded for the connector's class (pdcheck/known_defects.py) are strict expected
failures: they must show with their recorded symptom, or the test fails."""

from __future__ import annotations

import pytest

from pdcheck.conformance.battery import MAX_TOKENS, SEED, drain_s, replay_line
from pdcheck.gate import run_config
from pdcheck.known_defects import known_defect
from pdcheck.plugin import connector_under_test, engine_specs
from pdcheck.profiles import FailureClass
from pdcheck.report.terminal import failure_line
from pdcheck.types import Outcome
from pdcheck.workload.boundary import boundary_lengths, boundary_workload

FAILURE_CLASS = FailureClass.EQUIVALENCE


class KnownDefectShown(Exception):
    """The request failed exactly as its known defect says."""


def pytest_generate_tests(metafunc):
    if "equivalence_case" in metafunc.fixturenames:
        lineage = connector_under_test(metafunc.config).lineage
        cases, ids = [], []
        for spec in engine_specs(metafunc.config):
            lengths = boundary_lengths(spec.block_size, spec.max_model_len - MAX_TOKENS)
            for i, n in enumerate(lengths):
                defect = known_defect(lineage, n, spec.block_size, lengths[:i])
                marks = [pytest.mark.xfail(strict=True, raises=KnownDefectShown, reason=defect.summary)] if defect else []
                cases.append(pytest.param((spec, n), marks=marks))
                ids.append(f"{spec.model.name}-{spec.dtype}-len{n}")
        metafunc.parametrize("equivalence_case", cases, ids=ids)


def checked_workload(pd_pool, pd_history, spec, specs):
    """The workload's verdicts for `spec`, run once; the next spec's deployment starts meanwhile."""
    def run():
        deployment, oracle = pd_pool.get(spec)
        if specs.index(spec) + 1 < len(specs):
            pd_pool.prefetch(specs[specs.index(spec) + 1])
        result = run_config(deployment, boundary_workload(spec, SEED, MAX_TOKENS), pd_history, oracle=oracle,
                            drain_s=drain_s(spec))
        return {c.prompt_len: c for c in result.requests}

    return pd_pool.once(("equivalence", spec), run)


@pytest.mark.vllm
def test_pd_matches_oracle_at_block_boundaries(equivalence_case, pd_pool, pd_history, pytestconfig, request):
    spec, prompt_len = equivalence_case
    checked = checked_workload(pd_pool, pd_history, spec, engine_specs(pytestconfig))[prompt_len]
    replay = replay_line(request, spec)
    if checked.known_defect and checked.counted == "known":
        raise KnownDefectShown(f"{checked.known_defect}: {failure_line(checked)}\n{replay}")
    assert checked.verdict.outcome is Outcome.MATCH, f"{failure_line(checked)}\n{replay}"

"""Equivalence: PD through the connector under test gives the oracle's tokens and logprobs.

One test per (model, dtype, prompt length) over the block-boundary workload. Each request
must `match`, and every request longer than one block must have loaded external KV (else it
is a silent `fallback`). Defects the gate found in connectors it does not own are strict
expected failures (pdcheck/known_defects.py): they must show as recorded, or the test fails.
"""

from __future__ import annotations

import pytest

from pdcheck.checker.compare import Outcome
from pdcheck.config import EngineSpec
from pdcheck.gate import check
from pdcheck.known_defects import known_defect
from pdcheck.plugin import engine_specs
from pdcheck.repro import replay_command
from pdcheck.report import failure_line
from pdcheck.workload.boundary import boundary_lengths

SEED, MAX_TOKENS = 0, 16


class KnownDefectShown(Exception):
    """The request failed exactly as its known defect says."""


def pytest_generate_tests(metafunc):
    if "equivalence_case" in metafunc.fixturenames:
        cases, ids = [], []
        for spec in engine_specs(metafunc.config):
            lengths = boundary_lengths(spec.block_size, spec.max_model_len - MAX_TOKENS)
            for i, n in enumerate(lengths):
                defect = known_defect(spec.connector.class_name, n, spec.block_size, lengths[:i])
                marks = [pytest.mark.xfail(strict=True, raises=KnownDefectShown, reason=defect.summary)] if defect else []
                cases.append(pytest.param((spec, n), marks=marks))
                ids.append(f"{spec.model.name}-{spec.dtype}-len{n}")
        metafunc.parametrize("equivalence_case", cases, ids=ids)


def checked_workload(pd_pool, pd_history, spec: EngineSpec, specs: list[EngineSpec]):
    """The workload's verdicts for `spec`, run once; the next spec's deployment starts meanwhile."""
    from pdcheck.workload.boundary import boundary_workload

    def run():
        deployment, oracle = pd_pool.get(spec)
        if specs.index(spec) + 1 < len(specs):
            pd_pool.prefetch(specs[specs.index(spec) + 1])
        calibration, checked = check(deployment, boundary_workload(spec, SEED, MAX_TOKENS), pd_history, oracle)
        return {c.prompt_len: c for c in checked}

    return pd_pool.once(("equivalence", spec), run)


@pytest.mark.vllm
def test_pd_matches_oracle_at_block_boundaries(equivalence_case, pd_pool, pd_history, pytestconfig):
    spec, prompt_len = equivalence_case
    checked = checked_workload(pd_pool, pd_history, spec, engine_specs(pytestconfig))[prompt_len]
    lengths = boundary_lengths(spec.block_size, spec.max_model_len - MAX_TOKENS)
    replay = replay_command(spec, SEED, MAX_TOKENS, lengths[: lengths.index(prompt_len) + 1])
    if checked.known_defect and checked.counted == "known":
        raise KnownDefectShown(f"{checked.known_defect}: {failure_line(checked)}\nreplay: {replay}")
    assert checked.verdict.outcome is Outcome.MATCH, f"{failure_line(checked)}\nreplay: {replay}"

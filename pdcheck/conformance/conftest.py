"""Fixtures every battery module is written against: the connector under test and its profile,
the engine settings to run it with, and a skip for the failure classes its profile opts out of."""

from __future__ import annotations

import pytest

from pdcheck.config import ConnectorSpec, EngineSpec
from pdcheck.known_defects import recorded_failure
from pdcheck.plugin import connector_under_test, engine_specs
from pdcheck.profiles import FailureClass, Profile


@pytest.fixture(scope="session")
def connector(pytestconfig) -> ConnectorSpec:
    return connector_under_test(pytestconfig)


@pytest.fixture(scope="session")
def profile(connector) -> Profile:
    return connector.profile


@pytest.fixture(scope="session")
def spec(pytestconfig) -> EngineSpec:
    """The first (model, dtype) the options name: what the classes that need one run on."""
    return engine_specs(pytestconfig)[0]


@pytest.fixture(autouse=True)
def applies(request, profile):
    """Skip a test whose module's failure class (`FAILURE_CLASS`) the profile opts out of."""
    failure_class: FailureClass | None = getattr(request.module, "FAILURE_CLASS", None)
    reason = failure_class and profile.skip_reason(failure_class)
    if reason:
        pytest.skip(f"{failure_class.value} does not apply to {profile.connector}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test the connector's class is recorded to fail (pdcheck/known_defects.py) is a strict
    expected failure: failing with the recorded symptom, it is reported xfailed; failing
    otherwise, failed; passing, failed as a recorded defect that no longer shows."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or report.skipped:
        return
    recorded = recorded_failure(tuple(connector_under_test(item.config).lineage), item.name)
    if recorded is None:
        return
    if report.passed:
        report.outcome = "failed"
        report.longrepr = f"[XPASS(strict)] recorded defect {recorded.name} no longer shows: {recorded.summary}"
    elif recorded.shows(str(report.longrepr)):
        report.outcome, report.wasxfail = "skipped", f"recorded defect {recorded.name}: {recorded.summary}"
    else:
        report.sections.append(("recorded defect", f"{recorded.name} was expected, with a failure matching "
                                                   f"{recorded.symptom!r}; this failure does not match it"))

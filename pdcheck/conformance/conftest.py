"""Fixtures every battery module is written against: the connector under test and its profile,
the engine settings to run it with, and a skip for the failure classes its profile opts out of."""

from __future__ import annotations

import pytest

from pdcheck.config import ConnectorSpec, EngineSpec
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

"""xPyD pairings: 2P1D, 1P2D and 2P2D. Requests take the pairs in turn, so KV goes from each
prefill to each decode; an address, engine id or handle mixed up between instances shows as a
divergence, an error or a fallback on the pairs it breaks."""

from __future__ import annotations

import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.TOPOLOGY
LENGTHS = [33, 64, 65, 95, 96, 129, 160, 161]  # two rounds over every pair of 2P2D


@pytest.mark.vllm
@pytest.mark.parametrize("topology", [(2, 1), (1, 2), (2, 2)], ids=["2P1D", "1P2D", "2P2D"])
def test_every_pairing_matches(topology, spec, pd_pool, pd_history, request):
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, "xpyd"), topology=topology)
    assert not verdict(result, request, spec), verdict(result, request, spec)

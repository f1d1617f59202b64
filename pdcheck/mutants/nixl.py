"""NixlConnector mutants: vLLM's own NIXL connector (its pull variant, NixlConnector in 0.32)
with one bug class added, loadable as `--connector pdcheck.mutants.nixl:<Name>` (they need
nixl installed: `pip install 'pdcheck[nixl]'`). Each is driven by NixlConnector's profile, being
its subclass. The line that differs from NIXL's behaviour is marked `BUG`.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

FOREVER_S = 3600  # past any drain


class NixlCrossedLoads(NixlPullConnector):
    """KV delivered to the wrong request in a shared decode step: of two requests whose loads
    are set up in the same scheduler step with the same number of blocks, each gets the other's
    local blocks, so each request's KV is written into the other's cache."""

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        pending = self.connector_scheduler._reqs_need_recv
        mine = pending.get(request.request_id)
        if mine is None:
            return
        for other_id, other in pending.items():
            if other_id != request.request_id and list(map(len, other[1])) == list(map(len, mine[1])):
                # BUG: the two requests' local blocks crossed
                pending[request.request_id] = (mine[0], other[1], *mine[2:])
                pending[other_id] = (other[0], mine[1], *other[2:])
                return


class NixlNoLease(NixlPullConnector):
    """KV nobody claims is held forever (the class of vLLM #46283, an abort path that skips the
    free): prefill's lease on a request's blocks never runs out, so a request its client
    abandons between the legs keeps its blocks."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        extra["kv_lease_duration"] = FOREVER_S  # BUG: was 30 s, NIXL's default
        super().__init__(vllm_config, role, kv_cache_config)

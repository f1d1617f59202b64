"""The vLLM plugin: a thin facade that hands each call to its role's half.

    --kv-transfer-config '{"kv_connector": "P2PConnector",
        "kv_connector_module_path": "pdcheck.connector.plugin", "kv_role": "kv_both",
        "kv_connector_extra_config": {"port": 23001, "mode": "get"}}'

The scheduler half (pdcheck.connector.scheduler) and the worker half (.worker) hold all the
logic and import nothing from vLLM; this is the only module that does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pdcheck.connector.config import P2PConfig
from pdcheck.connector.scheduler import SchedulerHalf
from pdcheck.connector.worker import LoadEntry, SaveEntry, WorkerHalf


@dataclasses.dataclass
class P2PMetadata(KVConnectorMetadata):
    saves: list[SaveEntry]
    loads: list[LoadEntry]
    releases: list[str]  # keys kept for the children of an n>1 request, no longer needed


class P2PConnector(KVConnectorBase_V1):
    scheduler_class = SchedulerHalf  # variants (pdcheck.mutants) swap a half here
    worker_class = WorkerHalf

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = P2PConfig.from_extra(dict(self._kv_transfer_config.kv_connector_extra_config))
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = self.scheduler_class(config, vllm_config.cache_config.block_size)
        else:
            self.worker = self.worker_class(config)

    # -- scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        saves, loads, releases = self.scheduler.build_connector_meta(scheduler_output)
        return P2PMetadata(saves=saves, loads=loads, releases=releases)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.sends_finished(connector_output.finished_sending)

    def has_pending_push_work(self) -> bool:
        return self.scheduler.has_pending_frees

    # -- worker side -----------------------------------------------------------------------
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if meta.loads or meta.releases:
            layers = {name: layer.kv_cache for name, layer in forward_context.no_compile_layers.items()
                      if getattr(layer, "kv_cache", None) is not None}
            self.worker.load(meta.loads, layers, meta.releases)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self.worker.record_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        saves = self._get_connector_metadata().saves
        if saves:
            self.worker.save(saves)

    def get_finished(self, finished_req_ids: set[str]):
        return self.worker.finished(finished_req_ids) or None, None

    def held(self) -> str:
        """What the worker half still buffers ("" if nothing): read by pdcheck's drain check,
        which any connector can answer by defining `held()`."""
        return self.worker.held() if hasattr(self, "worker") else ""

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def shutdown(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()

"""MooncakeConnector with the part of vLLM's Mooncake proxy that pdcheck's PD path lacks.

vLLM 0.32's MooncakeConnector returns no kv_transfer_params from prefill
(`request_finished` returns `(delay_free, None)`, mooncake_connector.py:1114-1166): its proxy
makes up a `transfer_id` for both legs, asks the prefill instance's bootstrap server for its
engine id, and gives decode `do_remote_prefill`, `remote_engine_id`, `remote_bootstrap_addr`
and the same `transfer_id`. pdcheck passes what prefill returns to decode unchanged, so this
subclass does the proxy's part inside prefill's scheduler: the transfer (decode asks, prefill
pushes over Mooncake's transfer engine) is the stock connector's.

On a host with no accelerator it also lets the worker start: the stock worker asks
`torch.accelerator.current_device_index()` (mooncake_connector.py:1186), which raises
"Cannot access accelerator device when none is available" there, only to hand the index to
`current_platform.set_device`, a no-op on CPU (`torch.cpu.set_device`). The worker is built with
that call answering 0; nothing else is changed.

    pdcheck test --connector pdcheck.adapters.mooncake:ProxiedMooncakeConnector

Needs `mooncake-transfer-engine-non-cuda` (the `mooncake` extra) and Debian's libibverbs1.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from vllm import envs
from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.mooncake_connector import MooncakeConnector


class ProxiedMooncakeConnector(MooncakeConnector):
    def __init__(self, vllm_config, role, kv_cache_config):
        with cpu_device_index():
            super().__init__(vllm_config, role, kv_cache_config)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        params = request.kv_transfer_params
        if params and params.get("do_remote_decode"):
            params.setdefault("transfer_id", f"pdcheck-{request.request_id}")
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def request_finished(self, request, block_ids):
        delay_free, _ = super().request_finished(request, block_ids)
        return delay_free, self.decode_params(request) if delay_free else None

    def request_finished_all_groups(self, request, block_ids):
        delay_free, _ = super().request_finished_all_groups(request, block_ids)
        return delay_free, self.decode_params(request) if delay_free else None

    def decode_params(self, request) -> dict:
        """What vLLM's Mooncake proxy gives the decode leg."""
        return {"do_remote_prefill": True, "remote_engine_id": self.engine_id,
                "remote_bootstrap_addr": f"http://127.0.0.1:{envs.VLLM_MOONCAKE_BOOTSTRAP_PORT}",
                "transfer_id": request.kv_transfer_params["transfer_id"]}


def cpu_device_index():
    """Where no accelerator is present, `torch.accelerator.current_device_index` answers 0."""
    if torch.accelerator.is_available():
        return contextlib.nullcontext()
    return mock.patch.object(torch.accelerator, "current_device_index", return_value=0)

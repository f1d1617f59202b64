"""Negative controls: connectors that are wrong on purpose, so a suite can prove it catches them.

Each wraps vLLM's ExampleConnector on the decode side:
- PerturbBlockConnector damages the first block it loads for one target request, after the
  load: `mode` "block" replaces the whole block with noise, "element" adds `delta` to one
  element. The target is the request whose prompt starts with `target_prefix` (token ids).
- LoadNothingConnector reports no external hit, so decode recomputes everything: outputs
  still match, but nothing was transferred (a silent fallback).
- CrossedLoadsConnector: of two requests loaded in one decode step with as many tokens, each
  gets the other's slots, so each request's KV is written into the other's cache (KV to the
  wrong request in a shared step).
- NeverReleaseConnector (a reference-connector variant) never frees prefill's blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from pdcheck.connector.plugin import P2PConnector


class PerturbBlockConnector(ExampleConnector):
    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.target_prefix = [int(t) for t in extra["target_prefix"]]
        self.mode = extra.get("mode", "block")
        self.delta = float(extra.get("delta", 1e-2))
        if self.mode not in ("block", "element"):
            raise ValueError(f"PerturbBlockConnector mode {self.mode!r}: expected block or element")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)
        for request in self._get_connector_metadata().requests:
            prefix = request.token_ids[: len(self.target_prefix)].tolist()
            if not request.is_store and len(request.slot_mapping) and prefix == self.target_prefix:
                self.damage(forward_context, int(request.slot_mapping[0]) // self._block_size)

    def damage(self, forward_context, block: int) -> None:
        layers = [layer for layer in forward_context.no_compile_layers.values() if hasattr(layer, "kv_cache")]
        kv = layers[0].kv_cache
        with torch.no_grad():
            if self.mode == "block":
                noise = torch.randn(kv[block].shape, generator=torch.Generator().manual_seed(block))
                kv[block] = noise.to(kv.dtype)
            else:
                kv[(block,) + (0,) * (kv.dim() - 1)] += self.delta


class LoadNothingConnector(ExampleConnector):
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False


class CrossedLoadsConnector(ExampleConnector):
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        loads = [r for r in self._get_connector_metadata().requests if not r.is_store]
        for first, second in zip(loads, loads[1:]):
            if len(first.slot_mapping) == len(second.slot_mapping):
                first.slot_mapping, second.slot_mapping = second.slot_mapping, first.slot_mapping  # BUG: crossed
                break
        super().start_load_kv(forward_context, **kwargs)


class NeverReleaseConnector(P2PConnector):
    """The reference connector, except prefill never reports a send as finished: vLLM keeps
    every prefilled request's blocks forever (a leak the drain check must report)."""

    def get_finished(self, finished_req_ids: set[str]):
        self.worker.finished(finished_req_ids)
        return None, None

    def has_pending_push_work(self) -> bool:
        return False

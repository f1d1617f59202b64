"""Reference-connector mutants: known PD bug classes, each a few lines from the correct code.

Each is a P2PConnector with one half swapped, loadable as
`--connector pdcheck.mutants.connector:<Name>` with the reference connector's settings.
"""

from __future__ import annotations

import torch

from pdcheck.connector.layouts import extract, inject
from pdcheck.connector.plugin import P2PConnector
from pdcheck.connector.scheduler import SchedulerHalf
from pdcheck.connector.worker import WorkerHalf, log


class EngineLocalKeyScheduler(SchedulerHalf):
    def new_transfer_key(self, request) -> str:
        return request.request_id  # vLLM appends a random suffix per engine

    def load_key(self, request) -> str:
        return request.request_id


class EngineLocalKeys(P2PConnector):
    """Transfer keys built from engine-local request ids (vLLM issue #42839): decode waits for
    a key prefill never used."""

    scheduler_class = EngineLocalKeyScheduler


class SkipMissingWorker(WorkerHalf):
    def load_failed(self, entry, error) -> None:
        log.warning("load of %s failed, going on without it: %s", entry.transfer_key, error)


class SkipMissingKV(P2PConnector):
    """A failed load is logged and skipped while vLLM counts the tokens as computed: decode
    runs on whatever the blocks held (silent corruption)."""

    worker_class = SkipMissingWorker


class CorruptOnLoadWorker(WorkerHalf):
    def load(self, entries, layers) -> None:
        super().load(entries, layers)
        for entry in entries:
            for cache in layers.values():
                first = entry.block_ids[:1]
                if first:
                    block = extract(cache, self.config.layout, first)
                    noise = torch.randn(block.shape, generator=torch.Generator().manual_seed(first[0]))
                    inject(cache, self.config.layout, first, noise.to(block.dtype))


class CorruptOnLoad(P2PConnector):
    """KV damaged on its way into decode's cache with nothing to notice (as a receive buffer
    written on the wrong CUDA stream, vLLM #6459): the first loaded block of every request is
    noise. Plausible tokens, wrong ones."""

    worker_class = CorruptOnLoadWorker

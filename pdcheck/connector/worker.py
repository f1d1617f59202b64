"""The worker half: moves KV between the paged caches and the wire. No vLLM import.

Save (prefill): at the end of the step that completes a prompt, the request's blocks are
copied out of every layer at once (so no later reuse of those blocks can change what is sent)
into one tensor [layers, blocks, ...]. GET leaves it in the Outbox for decode to pull; PUT
pushes it inline; PUT_ASYNC hands the copy to the send thread.
Load (decode): fetch (pull, or take from the Inbox) with a deadline, then inject into the
request's blocks. A load that fails reports its block ids; it is never skipped silently.
A request counts as done sending once its KV has left and the scheduler has finished it.
Every save and load is written to the transfer log (pdcheck.connector.stats) when one is set.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import msgspec
import torch
import zmq

from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.config import Mode, P2PConfig
from pdcheck.connector.layouts import extract, inject
from pdcheck.connector.protocol import ProtocolError
from pdcheck.connector.stats import TransferLog, TransferRecord
from pdcheck.connector.tcp import KVClient, KVServer, to_frame

log = logging.getLogger("pdcheck.connector")


class SaveEntry(msgspec.Struct, frozen=True):
    request_id: str
    transfer_key: str
    block_ids: list[int]
    remote: str | None = None  # decode's address, for PUT modes


class LoadEntry(msgspec.Struct, frozen=True):
    """Load the prompt's blocks first_block.. (those before are local prefix-cache hits) into
    `block_ids`."""

    request_id: str
    transfer_key: str
    block_ids: list[int]
    remote: str  # prefill's address
    first_block: int = 0


def check_fits(entry: LoadEntry, data: torch.Tensor, layers: dict[str, torch.Tensor], layout) -> None:
    """Refuse KV that does not fit this cache (other model, dtype, block size or layout), so
    it fails as a load error instead of being written in."""
    cache = layers[min(layers)]
    block = list(extract(cache, layout, [0]).shape[1:])
    need = [len(layers), entry.first_block + len(entry.block_ids), *block]
    got = list(data.shape)
    if data.dtype != cache.dtype or got[:1] + got[2:] != need[:1] + need[2:] or got[1] < need[1]:
        raise ProtocolError(f"{entry.transfer_key}: peer sent {got} {data.dtype}, this cache needs "
                            f"{need} {cache.dtype} (layers, blocks, one block)")


class WorkerHalf:
    def __init__(self, config: P2PConfig, client_factory=KVClient):
        """`client_factory(context)` makes this half's clients: the seam where faults enter."""
        self.config = config
        self.context = zmq.Context()
        self.outbox = Outbox(config.hold_s)
        self.inbox = Inbox(config.buffer_bytes, config.spill_bytes)
        self.server = KVServer(self.context, config.address, self.outbox, self.inbox, config.deadline_s).start()
        self.client_factory = client_factory
        self.client = self.new_client()
        self.log = TransferLog(config.stats_path)
        self.layers: dict[str, torch.Tensor] = {}
        self.load_errors: set[int] = set()
        self.sent: set[str] = set()
        self.finished_by_scheduler: set[str] = set()
        self.lock = threading.Lock()
        self.sends: queue.Queue = queue.Queue()
        self.sender = None
        if config.mode is Mode.PUT_ASYNC:
            self.sender = threading.Thread(target=self.send_loop, name="pdcheck-kv-sender", daemon=True)
            self.sender.start()

    def new_client(self) -> KVClient:
        client = self.client_factory(self.context)
        client.name, client.max_bytes = self.config.address, self.config.buffer_bytes + self.config.spill_bytes
        return client

    # -- save (prefill) ------------------------------------------------------------------
    def record_layer(self, name: str, cache: torch.Tensor) -> None:
        self.layers[name] = cache

    def save(self, entries: list[SaveEntry]) -> None:
        for entry in entries:
            data = torch.stack([extract(self.layers[n], self.config.layout, entry.block_ids) for n in sorted(self.layers)])
            self.log.record(TransferRecord(entry.transfer_key, "save", len(entry.block_ids), data.nbytes, 0.0))
            if self.config.mode is Mode.GET:
                self.outbox.put(entry.transfer_key, entry.request_id, to_frame(entry.transfer_key, data))
            elif self.config.mode is Mode.PUT:
                self.push(entry, data)
            else:
                self.sends.put((entry, data))

    def push(self, entry: SaveEntry, data: torch.Tensor) -> None:
        client = self.client if threading.current_thread() is not self.sender else self.sender_client
        try:
            client.push(entry.remote, entry.transfer_key, data, self.config.deadline_s)
        except (TimeoutError, ProtocolError) as e:
            log.error("push of %s to %s failed: %s", entry.transfer_key, entry.remote, e)
        with self.lock:
            self.sent.add(entry.request_id)

    def send_loop(self) -> None:
        self.sender_client = self.new_client()
        while (item := self.sends.get()) is not None:
            self.push(*item)
        self.sender_client.close()

    # -- load (decode) -------------------------------------------------------------------
    def load(self, entries: list[LoadEntry], layers: dict[str, torch.Tensor]) -> None:
        for entry in entries:
            started = time.monotonic()
            try:
                data = self.fetch(entry)
                check_fits(entry, data, layers, self.config.layout)
                for i, name in enumerate(sorted(layers)):
                    blocks = data[i, entry.first_block : entry.first_block + len(entry.block_ids)]
                    inject(layers[name], self.config.layout, entry.block_ids, blocks)
            except (TimeoutError, ProtocolError) as e:
                self.load_failed(entry, e)
            else:
                self.log.record(TransferRecord(entry.transfer_key, "load", len(entry.block_ids), data.nbytes,
                                               time.monotonic() - started))

    def load_failed(self, entry: LoadEntry, error: Exception) -> None:
        """Report the blocks, so vLLM fails or recomputes the request: never decode on them."""
        log.error("load of %s failed: %s", entry.transfer_key, error)
        self.log.record(TransferRecord(entry.transfer_key, "load", len(entry.block_ids), 0, 0.0, str(error)))
        self.load_errors.update(entry.block_ids)

    def fetch(self, entry: LoadEntry) -> torch.Tensor:
        if self.config.mode is Mode.GET:
            return self.client.pull(entry.remote, entry.transfer_key, self.config.deadline_s)
        data = self.inbox.take(entry.transfer_key, self.config.deadline_s)
        if data is None:
            raise TimeoutError(f"{entry.transfer_key} was not pushed within {self.config.deadline_s}s")
        return data

    # -- bookkeeping ---------------------------------------------------------------------
    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests done sending: their KV left, and the scheduler has finished them."""
        with self.lock:
            self.sent |= self.outbox.finished()
            self.finished_by_scheduler |= finished_req_ids
            done = self.sent & self.finished_by_scheduler
            self.sent -= done
            self.finished_by_scheduler -= done
        return done

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def close(self) -> None:
        if self.sender is not None:
            self.sends.put(None)
            self.sender.join(self.config.deadline_s + 1)
        self.server.stop()
        self.client.close()
        self.context.term()

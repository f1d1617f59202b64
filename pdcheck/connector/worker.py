"""The worker half: moves KV between the paged caches and the wire. No vLLM import.

Save (prefill): at the end of the step that completes a prompt, the request's blocks are
copied out of every layer at once (so no later reuse of those blocks can change what is sent)
into one tensor [layers, blocks, ...], on the caller's stream. GET offers it on the data plane
for decode to pull; PUT pushes it inline; PUT_ASYNC hands the copy to the send thread.
Load (decode): fetch (pull, or take what was pushed) with a deadline, then inject into the
request's blocks. A load that fails reports its block ids; it is never skipped silently.
The data plane (config.plane: TCP or NCCL, pdcheck.connector.planes) moves the bytes.
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

from pdcheck.connector.config import Mode, P2PConfig
from pdcheck.connector.layouts import extract, inject
from pdcheck.connector.planes import DataPlane, make_plane
from pdcheck.connector.protocol import ProtocolError
from pdcheck.connector.stats import TransferLog, TransferRecord

log = logging.getLogger("pdcheck.connector")


class SaveEntry(msgspec.Struct, frozen=True):
    request_id: str
    transfer_key: str
    block_ids: list[int]
    remote: str | None = None  # decode's address, for PUT modes


class LoadEntry(msgspec.Struct, frozen=True):
    """Load the prompt's blocks first_block.. (those before are local prefix-cache hits) into
    `block_ids`. `shared`: this key was pulled already (by an earlier entry of the step, or
    kept from an earlier step): copy that KV. `keep`: keep what this pull brings until released."""

    request_id: str
    transfer_key: str
    block_ids: list[int]
    remote: str  # prefill's address
    first_block: int = 0
    shared: bool = False
    keep: bool = False


def check_fits(entry: LoadEntry, data: torch.Tensor, layers: dict[str, torch.Tensor], layout) -> None:
    """Refuse KV that does not fit this cache (other model, dtype, block size, layout or
    device), so it fails as a load error instead of being written in."""
    cache = layers[min(layers)]
    block = list(extract(cache, layout, [0]).shape[1:])
    need = [len(layers), entry.first_block + len(entry.block_ids), *block]
    got = list(data.shape)
    if data.dtype != cache.dtype or got[:1] + got[2:] != need[:1] + need[2:] or got[1] < need[1]:
        raise ProtocolError(f"{entry.transfer_key}: peer sent {got} {data.dtype}, this cache needs "
                            f"{need} {cache.dtype} (layers, blocks, one block)")
    if data.device != cache.device:
        raise ProtocolError(f"{entry.transfer_key}: KV arrived on {data.device}, this cache is on {cache.device}")


class WorkerHalf:
    def __init__(self, config: P2PConfig, client_factory=None):
        """`client_factory(context)` makes the plane's client (by default the plane's own
        KVClient or NcclClient): the seam where wire faults enter."""
        self.config = config
        self.plane = self.make_plane(client_factory)
        self.log = TransferLog(config.stats_path)
        self.layers: dict[str, torch.Tensor] = {}
        self.load_errors: set[int] = set()
        self.kept: dict[str, torch.Tensor] = {}  # pulled KV kept for the children of an n>1 request
        self.sent: set[str] = set()
        self.finished_by_scheduler: set[str] = set()
        self.lock = threading.Lock()
        self.sends: queue.Queue = queue.Queue()
        self.sender = None
        if config.mode is Mode.PUT_ASYNC:
            self.sender = threading.Thread(target=self.send_loop, name="pdcheck-kv-sender", daemon=True)
            self.sender.start()

    def make_plane(self, client_factory) -> DataPlane:
        """The plane config.plane names: the seam where a variant swaps in its own."""
        return make_plane(self.config, client_factory)

    # -- save (prefill) ------------------------------------------------------------------
    def record_layer(self, name: str, cache: torch.Tensor) -> None:
        self.layers[name] = cache

    def save(self, entries: list[SaveEntry]) -> None:
        for entry in entries:
            data = torch.stack([extract(self.layers[n], self.config.layout, entry.block_ids) for n in sorted(self.layers)])
            self.log.record(TransferRecord(entry.transfer_key, "save", len(entry.block_ids), data.nbytes, 0.0))
            staged = self.plane.stage(entry.transfer_key, data)
            if self.config.mode is Mode.GET:
                self.plane.offer(entry.transfer_key, entry.request_id, staged)
            elif self.config.mode is Mode.PUT:
                self.push(entry, staged)
            else:
                self.sends.put((entry, staged))

    def push(self, entry: SaveEntry, staged) -> None:
        try:
            self.plane.push(entry.remote, entry.transfer_key, staged)
        except (TimeoutError, ProtocolError) as e:
            log.error("push of %s to %s failed: %s", entry.transfer_key, entry.remote, e)
        with self.lock:
            self.sent.add(entry.request_id)

    def send_loop(self) -> None:
        while (item := self.sends.get()) is not None:
            self.push(*item)

    # -- load (decode) -------------------------------------------------------------------
    def load(self, entries: list[LoadEntry], layers: dict[str, torch.Tensor], releases: list[str] = ()) -> None:
        """Load each entry; then stop keeping the released keys."""
        fetched = dict(self.kept)  # this step's pulls and the kept ones, for the entries sharing them
        for entry in entries:
            started = time.monotonic()
            try:
                data = fetched[entry.transfer_key] = self.fetch(entry, fetched)
                if entry.keep:
                    self.kept[entry.transfer_key] = data
                check_fits(entry, data, layers, self.config.layout)
                for i, name in enumerate(sorted(layers)):
                    blocks = data[i, entry.first_block : entry.first_block + len(entry.block_ids)]
                    inject(layers[name], self.config.layout, entry.block_ids, blocks)
            except (TimeoutError, ProtocolError) as e:
                self.load_failed(entry, e)
            else:
                self.log.record(TransferRecord(entry.transfer_key, "load", len(entry.block_ids), data.nbytes,
                                               time.monotonic() - started))
        for key in releases:
            self.kept.pop(key, None)

    def load_failed(self, entry: LoadEntry, error: Exception) -> None:
        """Report the blocks, so vLLM fails or recomputes the request: never decode on them."""
        log.error("load of %s failed: %s", entry.transfer_key, error)
        self.log.record(TransferRecord(entry.transfer_key, "load", len(entry.block_ids), 0, 0.0, str(error)))
        self.load_errors.update(entry.block_ids)

    def fetch(self, entry: LoadEntry, fetched: dict[str, torch.Tensor]) -> torch.Tensor:
        if entry.shared:
            if entry.transfer_key not in fetched:
                raise ProtocolError(f"{entry.transfer_key}: the pull this load shares failed")
            return fetched[entry.transfer_key]
        if self.config.mode is Mode.GET:
            return self.plane.pull(entry.remote, entry.transfer_key)
        return self.plane.take(entry.transfer_key)

    # -- bookkeeping ---------------------------------------------------------------------
    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests done sending: their KV left, and the scheduler has finished them."""
        with self.lock:
            self.sent |= self.plane.finished()
            self.finished_by_scheduler |= finished_req_ids
            done = self.sent & self.finished_by_scheduler
            self.sent -= done
            self.finished_by_scheduler -= done
        return done

    def held(self) -> str:
        """What this half still buffers, in words ("" if nothing): KV staged for a pull that has
        not come, KV received (or room reserved for it) that no load has taken."""
        held = []
        if staged := self.plane.outbox.num_waiting:
            held.append(f"{staged} staged for a pull")
        if received := self.plane.inbox.used_bytes:
            held.append(f"{received} bytes received and not loaded")
        if self.kept:
            held.append(f"{len(self.kept)} pulled and kept for children")
        return ", ".join(held)

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def close(self) -> None:
        if self.sender is not None:
            self.sends.put(None)
            self.sender.join(self.config.deadline_s + 1)
        self.plane.close()

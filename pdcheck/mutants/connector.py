"""Reference-connector mutants: known PD bug classes, each a few lines from the correct code.

Each is a P2PConnector with one half swapped, loadable as
`--connector pdcheck.mutants.connector:<Name>` with the reference connector's settings. The
line that differs from the correct code is marked `BUG`. Two classes here are not mutants but
the correct code a mutant is caught beside: LiveRead (sends read the paged cache late, with the
blocks held until sent) and DropFirstPush (the reference on a link that loses one message).
pdcheck/mutants/catalogue.py lists every mutant with the test that catches it.
"""

from __future__ import annotations

import contextlib
import math
import time

import hashlib

import msgspec
import torch

from pdcheck.connector.buffers import Outbox
from pdcheck.connector.config import Mode
from pdcheck.connector.layouts import extract, inject
from pdcheck.connector.plugin import P2PConnector
from pdcheck.connector.scheduler import SchedulerHalf
from pdcheck.connector.stats import TransferRecord
from pdcheck.connector.tcp import KVClient, to_frame
from pdcheck.connector.worker import WorkerHalf, log
from pdcheck.faults.wire import FaultyClient, WireFault as Fault


class EngineLocalKeyScheduler(SchedulerHalf):
    def new_transfer_key(self, request) -> str:
        return request.request_id  # vLLM appends a random suffix per engine

    def load_key(self, request) -> str:
        return request.request_id


class EngineLocalKeys(P2PConnector):
    """Transfer keys built from engine-local request ids (vLLM issue #42839): decode waits for
    a key prefill never used."""

    scheduler_class = EngineLocalKeyScheduler


class PromptKeyScheduler(SchedulerHalf):
    def new_transfer_key(self, request) -> str:
        return hashlib.sha256(str(list(request.prompt_token_ids)).encode()).hexdigest()[:32]  # BUG: not unique


class PromptKeys(P2PConnector):
    """Transfer keys made from the prompt, as a content-addressed store keys them (the class of
    vLLM #22965, identical prompts sent repeatedly): identical prompts in flight together share a
    key, so one request's KV replaces the other's, the other's load fails, and the replaced
    request's blocks are never reported sent."""

    scheduler_class = PromptKeyScheduler


class PullEveryLoadScheduler(SchedulerHalf):
    def was_pulled(self, params) -> bool:
        return False

    def share_pulls(self, loads):
        return loads  # BUG: every load pulls its key, though prefill serves a key once


class PullPerChild(P2PConnector):
    """Each child of an n>1 request pulls its parent's transfer key itself: the first pull
    consumes it, prefill refuses the others ("unknown transfer key"), and vLLM fails the
    request. The reference connector's behaviour before children shared one pull."""

    scheduler_class = PullEveryLoadScheduler


class ReplayingOutbox(Outbox):
    def peek(self, key: str):
        return super().peek(key) or self.reread(key)

    def take(self, key: str):
        return super().take(key) or self.reread(key)  # BUG: a consumed key is served again


class ServeReplaysWorker(WorkerHalf):
    def make_plane(self, client_factory):
        plane = super().make_plane(client_factory)
        self.saved: dict[str, list[int]] = {}
        plane.outbox.__class__ = ReplayingOutbox  # the server already holds this outbox: change it in place
        plane.outbox.reread = self.reread
        return plane

    def save(self, entries) -> None:
        super().save(entries)
        self.saved.update({entry.transfer_key: entry.block_ids for entry in entries})

    def reread(self, key: str):
        """The KV of a consumed key, read now from the blocks its request had."""
        if key not in self.saved:
            return None
        data = torch.stack([extract(self.layers[n], self.config.layout, self.saved[key]) for n in sorted(self.layers)])
        return to_frame(key, data)


class ServeReplays(P2PConnector):
    """Transfer handles that never expire, as a connector reading prefill's blocks by id does:
    decode pulls whatever key it is given, and prefill answers a consumed key from the blocks its
    request had, freed since and reused by other prompts. Replayed transfer parameters decode
    from another request's KV."""

    scheduler_class = PullEveryLoadScheduler
    worker_class = ServeReplaysWorker


class LastBlockFailedWorker(WorkerHalf):
    def load_failed(self, entry, error) -> None:
        log.error("load of %s failed: %s", entry.transfer_key, error)
        self.load_errors.update(entry.block_ids[-1:])  # BUG: the blocks before the last are taken as loaded


class LastBlockFailed(P2PConnector):
    """A failed load reports only its last block: vLLM's recompute policy recomputes from there
    and keeps the blocks before it, which the load never wrote (the class of vLLM #49250: the
    recompute path reusing blocks a failed load left), and prefix caching serves them to the
    next identical prompt."""

    worker_class = LastBlockFailedWorker


class NoRedialClient(KVClient):
    def attempt(self, address, deadline_at, body):
        return body(deadline_at)  # BUG: a data connection to a peer that restarted since is used as it is


class NoRedialWorker(WorkerHalf):
    def __init__(self, config, client_factory=None):
        super().__init__(config, client_factory or NoRedialClient)


class NoRedial(P2PConnector):
    """Decode keeps its connections to a prefill that was restarted on the same address: the
    first transfer after the restart fails on the dead data connection (the class of stale
    bootstrap ports, SGLang #36029, and stale peer metadata, NIXL #1905)."""

    worker_class = NoRedialWorker


class ReshapeToFitWorker(WorkerHalf):
    def load(self, entries, layers, releases=()) -> None:
        self.block_shape = list(extract(layers[min(layers)], self.config.layout, [0]).shape[1:])
        super().load(entries, layers, releases)

    def fetch(self, entry, fetched):
        data = super().fetch(entry, fetched)
        return data.reshape(data.shape[0], -1, *self.block_shape)  # BUG: KV of another block size read as this one's


class ReshapeToFit(P2PConnector):
    """KV from a prefill of another block size is reshaped into this cache's blocks instead of
    refused (P/D asymmetry: block size 128 against 16, vLLM #42895): heads and token slots are
    read in the wrong places."""

    worker_class = ReshapeToFitWorker


class SkipMissingWorker(WorkerHalf):
    def load_failed(self, entry, error) -> None:
        log.warning("load of %s failed, going on without it: %s", entry.transfer_key, error)


class SkipMissingKV(P2PConnector):
    """A failed load is logged and skipped while vLLM counts the tokens as computed: decode
    runs on whatever the blocks held (silent corruption)."""

    worker_class = SkipMissingWorker


class CorruptOnLoadWorker(WorkerHalf):
    def load(self, entries, layers, releases=()) -> None:
        super().load(entries, layers, releases)
        for entry in entries:
            for cache in layers.values():
                first = entry.block_ids[:1]
                if first:
                    block = extract(cache, self.config.layout, first)
                    noise = torch.randn(block.shape, generator=torch.Generator().manual_seed(first[0]))
                    inject(cache, self.config.layout, first, noise.to(block.dtype))


class CorruptOnLoad(P2PConnector):
    """KV damaged on its way into decode's cache with nothing to notice (as a receive buffer
    written on the wrong CUDA stream, vLLM #20263): the first loaded block of every request is
    noise. Plausible tokens, wrong ones."""

    worker_class = CorruptOnLoadWorker


class LiveReadWorker(WorkerHalf):
    """Not a mutant: the control beside DeferredExtraction and FreeBeforeSend. PUT_ASYNC sending
    straight out of the paged cache, as NCCL and NIXL sends do: the save step hands the send
    thread block ids, not a copy, and the thread extracts them when it gets to the request, over
    a slow link (LINK_DELAY_S before each send). Correct while the blocks stay held until the
    send is done, which the reference's accounting (`finished`) ensures."""

    LINK_DELAY_S = 0.5

    def __init__(self, config, client_factory=None):
        if config.mode is not Mode.PUT_ASYNC:
            raise ValueError(f"mode {config.mode.value!r}: {type(self).__name__} sends from a put_async send thread")
        super().__init__(config, client_factory)

    def save(self, entries) -> None:
        for entry in entries:
            self.sends.put((entry, None))

    def push(self, entry, staged) -> None:
        if staged is None:
            time.sleep(self.LINK_DELAY_S)
            layers = [self.layers[name] for name in sorted(self.layers)]
            data = torch.stack([extract(cache, self.config.layout, entry.block_ids) for cache in layers])
            self.log.record(TransferRecord(entry.transfer_key, "save", len(entry.block_ids), data.nbytes, 0.0))
            staged = self.plane.stage(entry.transfer_key, data)
        super().push(entry, staged)


class LiveRead(P2PConnector):
    worker_class = LiveReadWorker


class DeferredExtractionWorker(LiveReadWorker):
    def save(self, entries) -> None:
        super().save(entries)
        with self.lock:
            self.sent.update(entry.request_id for entry in entries)  # BUG: the hand-off counted as the send


class DeferredExtraction(P2PConnector):
    """Repeated identical prompts give garbage (vLLM issue #22965, fixed by #23403): PUT_ASYNC's
    send thread extracts a request's KV from the live paged cache when it gets to it, instead of
    the save step copying it, while the request counts as sent once handed to the thread (an
    accounting that is safe only with the copy; the mechanism BUGS.md infers for #22965). vLLM
    frees the blocks at once; requests scheduled next write their KV into them before the thread
    reads. Needs mode put_async."""

    worker_class = DeferredExtractionWorker


class FreeBeforeSendWorker(LiveReadWorker):
    def __init__(self, config, client_factory=None):
        super().__init__(config, client_factory)
        self.unsent: set[str] = set()

    def save(self, entries) -> None:
        super().save(entries)
        with self.lock:
            self.unsent.update(entry.request_id for entry in entries)

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        with self.lock:
            self.sent |= finished_req_ids & self.unsent  # BUG: finished by the scheduler counted as sent
            self.unsent -= finished_req_ids
        return super().finished(finished_req_ids)


class FreeBeforeSend(P2PConnector):
    """Blocks freed before the send completes (vLLM issue #21570, "abnormal precision" under
    load; NIXL #52234, a previous prompt's answer returned): a send that reads the paged cache
    when it happens (LiveRead), with the request reported done sending as soon as the scheduler
    finishes it (max_tokens=1 on prefill), not once its KV left. vLLM frees the blocks, later
    requests reuse them, and the slow send then reads their KV. Needs mode put_async."""

    worker_class = FreeBeforeSendWorker


class DropFirstPushWorker(WorkerHalf):
    def __init__(self, config, client_factory=None):
        super().__init__(config, client_factory or (lambda context: FaultyClient(context, [Fault.DROP])))


class DropFirstPush(P2PConnector):
    """Not a mutant: the reference connector on a link that loses each instance's first transfer
    (pdcheck.faults.wire's DROP), the fault NoReceiveDeadline is caught under. In put mode
    prefill's first push never arrives; decode's receive deadline passes and the load fails
    cleanly (the request ends as an error), and later requests are not affected."""

    worker_class = DropFirstPushWorker


class UnboundedFetchWorker(WorkerHalf):
    def fetch(self, entry, fetched):
        while True:  # BUG: no deadline: waits for the KV however long it takes
            with contextlib.suppress(TimeoutError):
                return super().fetch(entry, fetched)


class NoPullDeadline(P2PConnector):
    """Unbounded waits (#44831) on a healthy link: decode's pull of a prefill that stopped
    answering (paused, wedged) retries for as long as it takes, so decode's engine step never
    returns while prefill is silent."""

    worker_class = UnboundedFetchWorker


class NoReceiveDeadlineWorker(UnboundedFetchWorker, DropFirstPushWorker):
    pass  # the unbounded wait on DropFirstPush's lossy link


class NoReceiveDeadline(P2PConnector):
    """Unbounded waits (2025 connector code had no receive timeout; #44831 proposed one): decode's
    receive waits until the KV comes, on the same lossy link as DropFirstPush. In put mode the
    lost push never comes, so decode's engine step never returns: only the gate's own deadline
    ends the request (as a hang)."""

    worker_class = NoReceiveDeadlineWorker


class KeepUnpulledWorker(WorkerHalf):
    def make_plane(self, client_factory):
        plane = super().make_plane(client_factory)
        plane.outbox.hold_s = math.inf  # BUG: KV nobody pulls waits for its pull forever (was config.hold_s)
        return plane


class KeepUnpulled(P2PConnector):
    """Leaks on abort (the class of vLLM #46283: an abort path skips the free): prefill keeps a
    request's KV, and so its blocks, until decode pulls it. A request the client abandons
    between the legs is never pulled, so its blocks are never reclaimed; enough aborts and no
    request fits."""

    worker_class = KeepUnpulledWorker


class IgnoreLocalHitScheduler(SchedulerHalf):
    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        entry = self.loads.get(request.request_id)
        if entry is not None:
            # BUG: prefill's blocks are read from the start, whatever decode had cached
            self.loads[request.request_id] = msgspec.structs.replace(entry, first_block=0)


class IgnoreLocalHit(P2PConnector):
    """Loads KV as if decode had no prefix hit: with the prompt's first blocks in decode's own
    cache, the rest of its blocks get prefill's blocks from the start of the prompt, not from
    after the hit (the class of a connector that takes num_computed_tokens as zero)."""

    scheduler_class = IgnoreLocalHitScheduler


class HoldAbortedPrefillScheduler(SchedulerHalf):
    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        pending = self.saves.get(request.request_id)
        held, params = super().request_finished(request, block_ids)
        if pending is not None and not pending.issued:  # a prompt that ended before it was saved: aborted
            self.delayed.add(request.request_id)
            return True, None  # BUG: its blocks wait for a send that was never issued
        return held, params


class HoldAbortedPrefill(P2PConnector):
    """An abort mid-prefill treated as a finished prefill (the class of vLLM #46283, an abort
    path that skips the free): the request's blocks wait for a send that never comes."""

    scheduler_class = HoldAbortedPrefillScheduler


class PartialLoadScheduler(SchedulerHalf):
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        return max(0, count - self.block_size), load_async  # BUG: the last block is left for decode to compute


class PartialLoad(P2PConnector):
    """Loads all of a prompt's KV but its last block and lets decode recompute that (the class of
    vLLM's silent fallbacks, #26896 and #42703, in part): the tokens are right, the transfer of
    the last block never tested, and decode does work PD was meant to save."""

    scheduler_class = PartialLoadScheduler

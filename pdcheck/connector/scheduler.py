"""The scheduler half: decides what to save and what to load, and when blocks may be freed.

No vLLM import: requests and scheduler outputs are read by attribute only.

Transfer parameters (`kv_transfer_params`):
- prefill leg in: {"do_remote_decode": true} (+ "remote_decode": "host:port" for PUT modes);
- prefill out, via request_finished: {"do_remote_prefill": true, "transfer_key": ...,
  "remote_prefill": "host:port", "num_prompt_tokens": n};
- decode leg in: what prefill returned.
The transfer key is a fresh uuid per prefill request (or one the caller put in the params),
never an engine-local request id, so identical prompts never share a key.

Prefill serves a key once. Decode's children of an n>1 request (vLLM names them
`<index>_<parent id>`) all carry their parent's transfer parameters, so one key: the first child
to be scheduled pulls it, and the worker keeps what it pulled for share_s, so the children
scheduled after it (usually a step later: they reach the engine one by one) copy it instead. A
request whose key this instance pulled and no longer keeps (parameters replayed, a child later
than share_s) recomputes its prompt rather than ask prefill for a key it has let go of.
"""

from __future__ import annotations

import math
import re
import time
import uuid

import msgspec

from pdcheck.connector.config import P2PConfig
from pdcheck.connector.worker import LoadEntry, SaveEntry

CHILD = re.compile(r"\d+_")  # vLLM's id for a child of an n>1 request: <index>_<parent id>


class PendingSave(msgspec.Struct):
    transfer_key: str
    prompt_len: int
    remote: str | None
    block_ids: list[int] = []
    issued: bool = False


class SchedulerHalf:
    def __init__(self, config: P2PConfig, block_size: int):
        self.config, self.block_size = config, block_size
        self.saves: dict[str, PendingSave] = {}
        self.loads: dict[str, LoadEntry] = {}
        self.local_hits: dict[str, int] = {}
        self.delayed: set[str] = set()  # finished requests whose blocks wait for their send
        self.loaded: set[str] = set()  # decode requests whose KV was loaded: a transfer is pulled once
        self.pulled: dict[str, float] = {}  # transfer key -> when this instance pulled it (kept for hold_s)
        self.kept: dict[str, float] = {}  # keys whose KV the worker keeps for children -> since when

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        prompt_len = len(request.prompt_token_ids or [])
        # decode loads all prompt tokens but the last: a 1-token prompt leaves it nothing to load,
        # and KV saved for it would wait unpulled for hold_s, its blocks pinned
        if params.get("do_remote_decode") and prompt_len > 1 and request.request_id not in self.saves:
            key = self.new_transfer_key(request)
            self.saves[request.request_id] = PendingSave(key, prompt_len, params.get("remote_decode"))
        if not params.get("do_remote_prefill") or request.request_id in self.loaded or self.was_pulled(params):
            # a request resumed after preemption, or whose key an earlier step pulled, recomputes:
            # prefill served that KV once
            return 0, False
        self.local_hits[request.request_id] = num_computed_tokens
        # decode computes the last prompt token itself, so it has logits to sample from
        return max(0, prompt_len - 1 - num_computed_tokens), False

    def new_transfer_key(self, request) -> str:
        """A key for a prefill request's KV: the caller's, or a fresh uuid (never an id local to
        this engine, which vLLM randomizes per instance)."""
        return (request.kv_transfer_params or {}).get("transfer_key") or uuid.uuid4().hex

    def was_pulled(self, params: dict) -> bool:
        """True if an earlier step of this instance pulled the key these parameters name and the
        worker no longer keeps it."""
        expired = time.monotonic() - self.config.hold_s  # prefill has let go of it by now anyway
        self.pulled = {key: at for key, at in self.pulled.items() if at > expired}
        key = params.get("transfer_key")
        return key in self.pulled and key not in self.kept

    def load_key(self, request) -> str:
        """The key decode loads by: the one prefill returned in the transfer parameters."""
        return request.kv_transfer_params["transfer_key"]

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        local = self.local_hits.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            return
        params = request.kv_transfer_params
        self.loaded.add(request.request_id)
        block_ids = list(blocks.get_block_ids()[0])
        first, end = local // self.block_size, math.ceil((local + num_external_tokens) / self.block_size)
        self.loads[request.request_id] = LoadEntry(
            request_id=request.request_id, transfer_key=self.load_key(request),
            block_ids=block_ids[first:end], remote=params["remote_prefill"], first_block=first,
        )

    def build_connector_meta(self, scheduler_output) -> tuple[list[SaveEntry], list[LoadEntry], list[str]]:
        """This step's saves (prompts it completes), loads (allocated since the last step) and
        the keys the worker may stop keeping."""
        loads, self.loads = self.share_pulls(list(self.loads.values())), {}
        progress = [(new.req_id, new.block_ids[0], new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            progress.append((req_id, new_blocks[0] if new_blocks else [], cached.num_computed_tokens[i]))
        saves = [save for p in progress if (save := self.advance(*p, scheduler_output.num_scheduled_tokens))]
        return saves, loads, self.releases()

    def share_pulls(self, loads: list[LoadEntry]) -> list[LoadEntry]:
        """The first load of each key pulls it, and a child's pull is kept for its siblings; a
        load of a key already pulled (this step, or kept from an earlier one) copies that."""
        now, shared = time.monotonic(), []
        for entry in loads:
            key = entry.transfer_key
            keep = bool(CHILD.match(entry.request_id)) and key not in self.pulled
            shared.append(msgspec.structs.replace(entry, shared=key in self.pulled, keep=keep))
            self.pulled[key] = self.pulled.get(key, now)
            if keep:
                self.kept[key] = now
        return shared

    def releases(self) -> list[str]:
        """Kept keys past their share_s: the worker drops them."""
        expired = time.monotonic() - self.config.share_s
        gone = [key for key, at in self.kept.items() if at <= expired]
        for key in gone:
            del self.kept[key]
        return gone

    def advance(self, req_id: str, new_block_ids, num_computed: int, num_scheduled: dict) -> SaveEntry | None:
        """Track a prefill request's blocks; its SaveEntry in the step that completes its prompt."""
        pending = self.saves.get(req_id)
        if pending is None or pending.issued:
            return None
        pending.block_ids = pending.block_ids + list(new_block_ids)
        if num_computed + num_scheduled.get(req_id, 0) < pending.prompt_len:
            return None
        pending.issued = True
        blocks = pending.block_ids[: math.ceil((pending.prompt_len - 1) / self.block_size)]  # what decode loads
        return SaveEntry(req_id, pending.transfer_key, blocks, pending.remote)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self.loaded.discard(request.request_id)
        pending = self.saves.pop(request.request_id, None)
        if pending is None or not pending.issued:
            return False, None
        self.delayed.add(request.request_id)
        return True, {
            "do_remote_prefill": True, "transfer_key": pending.transfer_key,
            "remote_prefill": self.config.address, "num_prompt_tokens": pending.prompt_len,
        }

    def sends_finished(self, request_ids) -> None:
        """The worker reported these requests done sending: vLLM frees their blocks now."""
        self.delayed -= set(request_ids or ())

    @property
    def has_pending_frees(self) -> bool:
        """True while blocks wait for sends, or the worker keeps KV for children: the engine
        must keep stepping to learn of the sends and to release what it keeps."""
        return bool(self.delayed or self.kept)

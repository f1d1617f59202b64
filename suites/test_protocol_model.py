"""The protocol tier: the connector core under a hypothesis state machine (no vLLM, no sockets).

A prefill and a decode peer, each a MemoryPlane with a worker half per mode over it, a paged
cache and one engine-step actor, run the real core (Outbox, Inbox, KVHandler, KVClient, the
msgspec messages, WorkerHalf's save and load) on pdcheck.testing.memory_transport's in-memory
transport and a FakeClock. Rules announce transfers (GET: decode pulls; PUT: prefill pushes),
let decode claim them, deliver, lose, duplicate and reorder messages, crash a peer (it restarts
empty), advance the clock, and heal (deliver everything, let every deadline and hold pass).
Checked after every step, each failure naming its invariant and the transfer key:
- ends exactly once: a load ends once, delivered (no load error, its blocks hold KV) or failed
  (exactly its blocks reported, none written), never both; prefill reports a request done
  sending (vLLM frees its blocks) at most once.
- right bytes: a delivered load's blocks hold its own transfer's KV (made from its index and
  checked per block and layer), never another's.
- every wait ends by its deadline: no pull, push or take is still waiting past deadline_s.
- no leak: once nothing is in flight and the hold has passed, prefill offers nothing and holds
  no block, decode's inbox holds no bytes (pushed KV or live reservation) and no block.
The reference core must pass; each mutant in pdcheck.mutants.protocol must be caught.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import deque
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
# hypothesis caches what it reads from source files under .hypothesis/ even with no database:
# keep that out of the repository (a storage directory set by the caller wins)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(__file__).resolve().parents[1] / "runs" / "hypothesis"))

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test,
)

from pdcheck.connector.config import Mode, P2PConfig  # noqa: E402
from pdcheck.connector.layouts import KVLayout, extract, inject  # noqa: E402
from pdcheck.connector.worker import LoadEntry, SaveEntry, WorkerHalf  # noqa: E402
from pdcheck.mutants.protocol import NoReplyDeadline, TakeKeepsKV  # noqa: E402
from pdcheck.testing.actors import Loop  # noqa: E402
from pdcheck.testing.clock import FakeClock  # noqa: E402
from pdcheck.testing.memory_transport import Core, MemoryPlane, Network  # noqa: E402

DEADLINE_S, HOLD_S = 1.0, 2.0
SLACK_S = 0.01  # a control wait polls in whole milliseconds
LAYOUT, LAYERS, NUM_BLOCKS, BLOCK = KVLayout.BLOCKS_FIRST, 2, 8, (1, 2, 2)  # [blocks, heads, block_size, C]
BLOCK_BYTES = LAYERS * 4 * 4  # float32
MAX_TRANSFERS, MAX_BLOCKS = 6, 3
PORTS = {"prefill": 5001, "decode": 5002}

MODEL_SETTINGS = settings(max_examples=1000, stateful_step_count=25, derandomize=True, database=None,
                          deadline=None, print_blob=False, suppress_health_check=list(HealthCheck))
MUTANT_SETTINGS = settings(MODEL_SETTINGS, max_examples=300, stateful_step_count=20, report_multiple_bugs=False)


def kv_of(index: int, num_blocks: int, layer: int) -> torch.Tensor:
    """Transfer `index`'s KV in one layer: every element says whose it is and where it sits."""
    base = (index + 1) * 1000 + layer * 100 + torch.arange(num_blocks).reshape(-1, 1) * 10
    return (base + torch.arange(4)).reshape(num_blocks, *BLOCK).float()


@dataclasses.dataclass(eq=False)
class Transfer:
    index: int
    mode: Mode
    src: list[int]  # prefill's blocks
    dst: list[int] = dataclasses.field(default_factory=list)  # decode's, once claimed
    claimed: bool = False
    outcome: str | None = None  # delivered | failed | crashed (decode died with the load)
    sent: int = 0  # times prefill reported it done sending
    prefill_gone: bool = False  # prefill crashed holding it

    @property
    def key(self) -> str:
        return f"key-{self.index}"

    @property
    def request_id(self) -> str:
        return f"req-{self.index}"


@dataclasses.dataclass(eq=False)
class Job:
    """One engine-step call on a peer: a save (prefill) or a load (decode) of one transfer."""

    transfer: Transfer
    kind: str
    run: Callable[[], Any]
    started_at: float = 0.0
    result: Any = None


class SharedPlaneWorker(WorkerHalf):
    """A worker half on its peer's one plane (the peer has a half per mode)."""

    def __init__(self, config: P2PConfig, plane: MemoryPlane):
        self.shared_plane = plane
        super().__init__(config)

    def make_plane(self, client_factory) -> MemoryPlane:
        return self.shared_plane


class Peer:
    """One instance: its plane, its halves, its paged cache, and its engine-step actor, which
    runs the jobs given to it in order."""

    def __init__(self, role: str, network: Network, core: Core):
        config = P2PConfig(port=PORTS[role], host=role, deadline_s=DEADLINE_S, hold_s=HOLD_S,
                           buffer_bytes=2 * BLOCK_BYTES, spill_bytes=BLOCK_BYTES)
        self.address, self.loop = config.address, network.loop
        self.plane = MemoryPlane(config, network, core)
        self.halves = {mode: SharedPlaneWorker(dataclasses.replace(config, mode=mode), self.plane)
                       for mode in (Mode.GET, Mode.PUT)}
        self.layers = {f"layer{i}": torch.zeros(NUM_BLOCKS, *BLOCK) for i in range(LAYERS)}
        for half in self.halves.values():
            for name, cache in self.layers.items():
                half.record_layer(name, cache)
        self.free = list(range(NUM_BLOCKS))
        self.jobs: deque[Job] = deque()
        self.busy: Job | None = None
        self.ended: list[Job] = []
        self.loop.spawn(self.address, f"{role}-step", self.step)

    def step(self) -> None:
        while True:
            if not self.jobs:
                self.loop.block(lambda: bool(self.jobs))
            job = self.busy = self.jobs.popleft()
            job.started_at = self.loop.clock()
            job.result = job.run()
            self.busy = None
            self.ended.append(job)

    def allocate(self, n: int) -> list[int]:
        blocks, self.free = self.free[:n], self.free[n:]
        return blocks

    def held(self, blocks: list[int]) -> list[torch.Tensor]:
        return [extract(self.layers[f"layer{i}"], LAYOUT, blocks) for i in range(LAYERS)]

    @property
    def queued(self) -> list[Job]:
        return [*self.jobs, *([self.busy] if self.busy else [])]


class ProtocolModel(RuleBasedStateMachine):
    core = Core()  # a mutant's model overrides it

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.loop = Loop(self.clock)
        self.network = Network(self.loop)
        self.peers = {role: Peer(role, self.network, self.core) for role in PORTS}
        self.transfers: list[Transfer] = []
        self.active_at = self.clock()
        self.settle()

    # -- rules -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.transfers) < MAX_TRANSFERS)
    @rule(mode=st.sampled_from([Mode.GET, Mode.PUT]), num_blocks=st.integers(1, MAX_BLOCKS))
    def announce(self, mode, num_blocks):
        """Prefill computes a prompt into fresh blocks and saves it: offers it (GET) or pushes it (PUT)."""
        prefill = self.peers["prefill"]
        if len(prefill.free) < num_blocks:
            return
        transfer = Transfer(len(self.transfers), mode, prefill.allocate(num_blocks))
        self.transfers.append(transfer)
        for i in range(LAYERS):
            inject(prefill.layers[f"layer{i}"], LAYOUT, transfer.src, kv_of(transfer.index, num_blocks, i))
        remote = self.peers["decode"].address if mode is Mode.PUT else None
        entry = SaveEntry(transfer.request_id, transfer.key, transfer.src, remote)
        half = prefill.halves[mode]
        prefill.jobs.append(Job(transfer, "save", lambda: half.save([entry])))
        self.touch()

    @precondition(lambda self: any(not t.claimed for t in self.transfers))
    @rule(pick=st.integers(0, MAX_TRANSFERS - 1))
    def claim(self, pick):
        """Decode's leg arrives: it loads the transfer into fresh blocks (pull, or take the push)."""
        waiting = [t for t in self.transfers if not t.claimed]
        transfer, decode = waiting[pick % len(waiting)], self.peers["decode"]
        if len(decode.free) < len(transfer.src):
            return
        transfer.claimed, transfer.dst = True, decode.allocate(len(transfer.src))
        for cache in decode.layers.values():
            cache[transfer.dst] = 0
        entry = LoadEntry(transfer.request_id, transfer.key, transfer.dst, self.peers["prefill"].address)
        half = decode.halves[transfer.mode]

        def load() -> set[int]:
            half.load([entry], decode.layers)
            return half.take_load_errors()

        decode.jobs.append(Job(transfer, "load", load))
        self.touch()

    @precondition(lambda self: self.network.pending)
    @rule(i=st.integers(0, 15))
    def deliver(self, i):
        self.network.deliver(i % len(self.network.pending))
        self.touch()

    @precondition(lambda self: self.network.pending)
    @rule(i=st.integers(0, 15))
    def lose(self, i):
        self.network.lose(i % len(self.network.pending))
        self.settle()

    @precondition(lambda self: self.network.pending)
    @rule(i=st.integers(0, 15))
    def duplicate(self, i):
        self.network.duplicate(i % len(self.network.pending))
        self.settle()

    @precondition(lambda self: len(self.network.pending) > 1)
    @rule(seed=st.integers(0, 7))
    def reorder(self, seed):
        random.Random(seed).shuffle(self.network.pending)
        self.settle()

    @rule(role=st.sampled_from(list(PORTS)))
    def crash(self, role):
        """The peer dies and restarts empty: what it held is gone, its peer must notice."""
        old = self.peers[role]
        for job in old.queued:
            if role == "decode":
                job.transfer.outcome = "crashed"
        for transfer in self.transfers:
            transfer.prefill_gone |= role == "prefill" and transfer.sent == 0
        self.network.crash(old.address)
        self.loop.settle()
        self.peers[role] = Peer(role, self.network, self.core)
        self.touch()

    @rule(seconds=st.sampled_from([0.25, DEADLINE_S, HOLD_S]))
    def advance(self, seconds):
        self.clock.advance(seconds)
        self.settle()

    @rule()
    def heal(self):
        """Deliver everything in flight, then let every deadline and hold pass."""
        for _ in range(int((HOLD_S + 2 * DEADLINE_S) / 0.25) + 1):
            for _ in range(100):
                if not self.network.pending:
                    break
                self.network.deliver(0)
                self.touch()
            self.clock.advance(0.25)
            self.settle()

    # -- bookkeeping -------------------------------------------------------------------------
    def touch(self) -> None:
        self.active_at = self.clock()
        self.settle()

    def settle(self) -> None:
        """Run the actors until all wait, then take in what the engines would see this step."""
        self.loop.settle()
        prefill, decode = self.peers["prefill"], self.peers["decode"]
        saved, prefill.ended = prefill.ended, []
        for mode, half in prefill.halves.items():
            finished = {job.transfer.request_id for job in saved if job.transfer.mode is mode}
            for request_id in half.finished(finished):
                self.done_sending(self.transfers[int(request_id.removeprefix("req-"))])
        loaded, decode.ended = decode.ended, []
        for job in loaded:
            self.load_ended(job.transfer, job.result)
        if saved or loaded:
            self.active_at = self.clock()

    def done_sending(self, transfer: Transfer) -> None:
        transfer.sent += 1
        assert transfer.sent == 1, (
            f"ends exactly once: prefill reported {transfer.key} done sending {transfer.sent} times "
            f"(its blocks {transfer.src} freed again)")
        self.peers["prefill"].free += transfer.src

    def load_ended(self, transfer: Transfer, errors: set[int]) -> None:
        decode = self.peers["decode"]
        assert transfer.outcome is None, f"ends exactly once: {transfer.key} ended again after {transfer.outcome}"
        held = decode.held(transfer.dst)
        if errors:
            assert errors == set(transfer.dst), (
                f"ends exactly once: {transfer.key} failed with load errors on {sorted(errors)}, "
                f"its blocks are {transfer.dst}")
            assert not any(h.any() for h in held), (
                f"ends exactly once: {transfer.key} failed, yet KV was written into its blocks (delivered and failed)")
            transfer.outcome = "failed"
        else:
            owner = self.whose(held)
            assert owner is transfer, (
                f"right bytes: {transfer.key} was delivered "
                f"{f'the KV of {owner.key}' if owner else 'KV of no transfer'} (mode {transfer.mode.value})")
            transfer.outcome = "delivered"
        decode.free += transfer.dst

    def whose(self, held: list[torch.Tensor]) -> Transfer | None:
        for transfer in self.transfers:
            if len(transfer.src) == len(held[0]) and all(
                    torch.equal(h, kv_of(transfer.index, len(transfer.src), i)) for i, h in enumerate(held)):
                return transfer
        return None

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def every_wait_ends_by_its_deadline(self):
        for peer in self.peers.values():
            job = peer.busy
            if job is not None and self.clock() - job.started_at > DEADLINE_S + SLACK_S:
                raise AssertionError(
                    f"every wait ends by its deadline: the {job.kind} of {job.transfer.key} "
                    f"({job.transfer.mode.value}) has waited {self.clock() - job.started_at:.2f}s, "
                    f"deadline {DEADLINE_S}s")

    @invariant()
    def nothing_leaks_once_every_transfer_ended(self):
        quiet = not self.network.pending and not any(p.queued for p in self.peers.values())
        if not quiet or self.clock() < self.active_at + HOLD_S + DEADLINE_S:
            return
        prefill, decode = self.peers["prefill"], self.peers["decode"]
        for transfer in self.transfers:
            assert transfer.outcome or not transfer.claimed, f"ends exactly once: {transfer.key} never ended"
            assert transfer.sent or transfer.prefill_gone, (
                f"no leak: {transfer.key} was never reported done sending: prefill still holds blocks {transfer.src}")
        offers = sorted(prefill.plane.outbox.waiting)
        assert not offers, f"no leak: prefill still offers {offers} after their hold"
        inbox = decode.plane.inbox
        inbox.drop_unclaimed()  # what decode's next push runs first
        held = sorted(inbox.entries) + sorted(k for k, (_, lapses) in inbox.reserved.items() if lapses > self.clock())
        assert inbox.used_bytes == 0, f"no leak: decode's inbox holds {inbox.used_bytes} bytes for {held}"
        for role, peer in self.peers.items():
            assert sorted(peer.free) == list(range(NUM_BLOCKS)), (
                f"no leak: {role} holds blocks {sorted(set(range(NUM_BLOCKS)) - set(peer.free))}")

    def teardown(self):
        self.loop.stop()


def test_transfers_end_once_with_their_own_bytes_by_their_deadlines_and_leak_nothing():
    run_state_machine_as_test(ProtocolModel, settings=MODEL_SETTINGS)


@pytest.mark.parametrize("core, invariant", [
    (Core(inbox=TakeKeepsKV), r"no leak: decode's inbox holds \d+ bytes for \['key-"),
    (Core(client=NoReplyDeadline), r"every wait ends by its deadline: the (load|save) of key-"),
], ids=["TakeKeepsKV", "NoReplyDeadline"])
def test_protocol_mutant_is_caught_by_the_state_machine(core, invariant):
    mutant_model = type("MutantProtocolModel", (ProtocolModel,), {"core": core})
    with pytest.raises(AssertionError, match=invariant):
        run_state_machine_as_test(mutant_model, settings=MUTANT_SETTINGS)

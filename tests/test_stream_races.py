"""Stream races on the NCCL plane, with real CUDA streams: the reference `NcclPeer` verifies every
transfer under each race, and each GPU mutant (pdcheck/mutants/gpu.py) is caught by the
per-block checksum in the race that targets its mechanism (BUGS.md: "garbled output, CUDA
streams" and "send before the layer's KV is written").

A race is a set of injectors, made deterministic with sleep kernels (`torch.cuda._sleep`):
- stall the sender's compute stream before the layer's KV write;
- right after the send is enqueued, free the sent blocks and write new content into them, and
  drop the staging buffer and write a same-size new tensor (the freed memory reused at once);
- on the receiver, queue a write of '!' bytes behind a stall on the default stream into a tensor
  of the request's size, free that tensor, and post the receive from another thread (whose
  current stream is the default one), with the checksum stream held back so that the write lands
  between the data and its verification;
- delay the receiver's receive stream.
Each scenario runs in two spawned processes (`run_pair`: rank 0 sends on GPU 0, rank 1 receives
on GPU 1; both on GPU 0, over NCCL's socket transport, where the machine has one GPU) for REPEATS
requests; rank 1 reports one outcome per request: "ok" (checksums match and the bytes equal what
was sent), "ChecksumError: ..." or "bytes differ ...". The reference
must give only "ok"; a mutant at least one ChecksumError naming a block. Failures print the
reproducer line. The sanitizer step of scripts/gpu_tier.sh reruns a reference race.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from pdcheck.connector.layouts import KVLayout, block_index  # noqa: E402
from pdcheck.connector.nccl import ChecksumError, LayerSpec, Transfer, recorded  # noqa: E402
from pdcheck.mutants.gpu import MUTANTS  # noqa: E402
from pdcheck.testing.gpu import run_pair  # noqa: E402

pytestmark = pytest.mark.gpu  # two GPUs where there are two; else both ranks on one
REFERENCE = "NcclPeer"
LAYOUT = KVLayout.FLASH_INFER
SEED, REPEATS = 7, 3
DEADLINE_S, PAIR_TIMEOUT_S = 60.0, 240.0
CYCLES_PER_MS = 2_000_000  # H100/H200 SMs clock at most ~1.98 GHz: a stall lasts at least its ms


@dataclass(frozen=True)
class Race:
    """The injectors of one scenario (0 ms or False: not used)."""

    stall_kv_write_ms: float = 0  # sender: compute stream sleeps before the KV write
    reuse_after_send: bool = False  # sender: sent blocks and staging memory rewritten at once
    recv_delay_ms: float = 0  # receiver: receive stream sleeps before the receive
    garbage_write_ms: float = 0  # receiver: default stream sleeps, then writes a freed tensor
    recv_thread: bool = False  # receiver: the receive is posted from another thread
    sum_delay_ms: float = 0  # receiver: checksum stream sleeps before verifying

    def warm_up(self) -> Race:
        """The same injectors with 1 ms stalls: a request that loads every kernel the race uses
        (a kernel's first load can wait for the GPU to go idle, which would serialize the race)."""
        stalls = ("stall_kv_write_ms", "recv_delay_ms", "garbage_write_ms", "sum_delay_ms")
        return dataclasses.replace(self, **{f: min(getattr(self, f), 1) for f in stalls})


RACES = {
    "compute_stall": Race(stall_kv_write_ms=500),
    "reuse_after_send": Race(reuse_after_send=True, recv_delay_ms=500),
    "other_thread_alloc": Race(garbage_write_ms=800, recv_thread=True, sum_delay_ms=1600),
    "recv_delay": Race(recv_delay_ms=500, stall_kv_write_ms=200),
}
TARGETS = {"SendBeforeKVWrite": "compute_stall", "RecvOnOtherStream": "other_thread_alloc"}


@dataclass(frozen=True)
class Case:
    """One request: blocks `block_ids` of each layer's bf16 cache (FlashInfer layout: blocks first)."""

    layers: int = 4
    cache_blocks: int = 16
    block_ids: tuple[int, ...] = (3, 0, 9, 14, 5, 11, 7, 2)
    block_size: int = 16
    heads: int = 8
    dim: int = 128
    seed: int = SEED

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec((len(self.block_ids), 2, self.block_size, self.heads, self.dim), torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.layers * math.prod(self.spec.shape) * self.spec.dtype.itemsize

    def fresh(self, repeat: int, device) -> torch.Tensor:
        """Request `repeat`'s new KV, [layers, n, *block], the same on both ranks (seeded on the CPU)."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + repeat)
        return torch.randn((self.layers, *self.spec.shape), generator=gen).to(self.spec.dtype).to(device)

    def caches(self, device) -> list[torch.Tensor]:
        shape = (self.cache_blocks, *self.spec.shape[1:])
        return [torch.zeros(shape, dtype=self.spec.dtype, device=device) for _ in range(self.layers)]


def stall(stream: torch.cuda.Stream, ms: float) -> None:
    if ms:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(int(ms * CYCLES_PER_MS))


def send_side(peer, race: Race, case: Case, repeat: int) -> None:
    """The KV write and the save path's copy into staging on the compute stream, then the send.
    Only device ops follow the stall: a host-to-device copy (an index made from a list) would make
    the host wait for the stalled stream, and the race would never be run."""
    compute = torch.cuda.current_stream()
    fresh, caches = case.fresh(repeat, peer.device), case.caches(peer.device)
    index = block_index(case.block_ids, peer.device)
    staging = torch.zeros_like(fresh)  # stale zeros: what a send that does not wait reads
    torch.cuda.synchronize(peer.device)
    stall(compute, race.stall_kv_write_ms)
    for layer, cache in enumerate(caches):
        cache.index_copy_(LAYOUT.block_dim, index, fresh[layer])
        staging[layer].copy_(cache.index_select(LAYOUT.block_dim, index))
    transfer = peer.send_blocks(list(staging.unbind(0)), recorded(compute))
    del staging  # let go at once: the transfer and the send stream keep what they need
    reused = reuse_at_once(caches, index, case) if race.reuse_after_send else None
    transfer.wait(DEADLINE_S)
    del reused


def reuse_at_once(caches: list[torch.Tensor], index: torch.Tensor, case: Case) -> torch.Tensor:
    """The sent blocks freed and written by a new request, and a new tensor of the staging's size
    (where the allocator would put it) written, all on the compute stream right away."""
    junk = torch.full(case.spec.shape, 7.0, dtype=case.spec.dtype, device=index.device)
    for cache in caches:
        cache.index_copy_(LAYOUT.block_dim, index, junk)
    return torch.empty(case.nbytes, dtype=torch.uint8, device=index.device).fill_(ord("!"))


def receive_side(peer, race: Race, case: Case, repeat: int) -> str:
    expected = case.fresh(repeat, peer.device)
    torch.cuda.synchronize(peer.device)
    torch.cuda.empty_cache()  # an empty pool: the block freed last is the one handed out next
    stall(peer.recv_stream, race.recv_delay_ms)
    stall(peer.sum_stream, race.sum_delay_ms)
    doomed = doomed_tensor(case.nbytes, race.garbage_write_ms, peer.device) if race.garbage_write_ms else None
    transfer = post_receive(peer, case, race.recv_thread)
    alias = "" if doomed is None else alias_note(transfer, doomed)
    try:
        received = transfer.wait(DEADLINE_S)
    except ChecksumError as e:
        return f"ChecksumError: {e}{alias}"
    bad = [i for i, got in enumerate(received) if not torch.equal(got.view(torch.int16), expected[i].view(torch.int16))]
    return f"bytes differ in layers {bad} though the checksums matched{alias}" if bad else f"ok{alias}"


def doomed_tensor(nbytes: int, stall_ms: float, device) -> int:
    """A tensor of the request's size on the default stream, written with '!' behind a stall and
    freed while that write is still queued; returns its address."""
    doomed = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stall(torch.cuda.current_stream(device), stall_ms)
    doomed.fill_(ord("!"))
    return doomed.data_ptr()  # freed on return: the allocator may hand it out on this stream at once


def alias_note(transfer: Transfer, doomed: int) -> str:
    reused = transfer.base is not None and transfer.base.data_ptr() == doomed
    return f" [receive buffer {'IS' if reused else 'is not'} the freed tensor's memory]"


def post_receive(peer, case: Case, in_thread: bool) -> Transfer:
    specs = [case.spec] * case.layers
    if not in_thread:
        return peer.recv_blocks(specs, block_ids=case.block_ids)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pdcheck-recv") as pool:
        posted = pool.submit(post_on_device, peer, specs, case.block_ids)
        return posted.result(timeout=DEADLINE_S)


def post_on_device(peer, specs: list[LayerSpec], block_ids) -> Transfer:
    torch.cuda.set_device(peer.device)  # a new thread: current stream = the default stream
    return peer.recv_blocks(specs, block_ids=block_ids)


def scenario(peer, rank: int, variant: str, race: Race, case: Case, repeats: int) -> list[str]:
    """After one warm-up request (its outcome dropped), rank 0 sends `repeats` requests and rank 1
    receives them and reports one outcome each."""
    if variant != REFERENCE:
        peer = MUTANTS[variant].over(peer)
    races = [race.warm_up()] + [race] * repeats
    if rank == 0:
        for repeat, each in enumerate(races):
            send_side(peer, each, case, repeat)
        return []
    return [receive_side(peer, each, case, repeat) for repeat, each in enumerate(races)][1:]


def run_race(request, variant: str, race_name: str) -> list[str]:
    outcomes = run_pair(scenario, (variant, RACES[race_name], Case(), REPEATS), PAIR_TIMEOUT_S)[1]
    request.node.user_properties.append(("outcomes", f"{variant} under {race_name}: " + " | ".join(outcomes)))
    return outcomes


def reproducer(request, variant: str, race_name: str) -> str:
    return (f"reproduce: pytest '{request.node.nodeid}' -p pdcheck.plugin  "
            f"# variant={variant} seed={SEED} repeats={REPEATS} race={race_name}={RACES[race_name]}")


@pytest.mark.parametrize("race_name", list(RACES))
def test_reference_connector_verifies_every_transfer_under_stream_races(request, race_name):
    outcomes = run_race(request, REFERENCE, race_name)
    bad = [f"request {i}: {o}" for i, o in enumerate(outcomes) if not o.startswith("ok")]
    verified = len(outcomes) - len(bad)
    request.node.user_properties.append(("verified", f"{REFERENCE} under {race_name}: {verified}/{len(outcomes)}"))
    assert not bad, "\n".join([*bad, reproducer(request, REFERENCE, race_name)])


@pytest.mark.parametrize("mutant", list(TARGETS))
def test_stream_mutant_is_caught_by_the_block_checksum_in_its_race(request, mutant):
    race_name = TARGETS[mutant]
    outcomes = run_race(request, mutant, race_name)
    caught = [o for o in outcomes if o.startswith("ChecksumError: layer ") and "checksum mismatch" in o]
    request.node.user_properties.append(("caught", f"{mutant}: {len(caught)}/{len(outcomes)} by the checksum"))
    lines = [f"request {i}: {o}" for i, o in enumerate(outcomes)]
    assert caught, "\n".join([f"{mutant} escaped the checksum:", *lines, reproducer(request, mutant, race_name)])

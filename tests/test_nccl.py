"""The NCCL plane between two ranks: blocks arrive bitwise exact in every layout, several requests
can be in flight, a corrupted block is named by its checksum, and a receive from a peer that
never sends ends at its deadline instead of hanging.

Each test runs a scenario in two spawned processes (rank r on GPU r, or both on one GPU over NCCL's
socket transport where the machine has one: `run_pair` owns them, `place` says where): rank
0 extracts and sends, rank 1 receives, injects and checks. Both build their data from the case
alone (seeded on the CPU), so rank 1 knows what rank 0 sent. Scenarios return failure lines.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from pdcheck.connector.layouts import KVLayout, extract, inject, num_blocks  # noqa: E402
from pdcheck.connector.nccl import ChecksumError, LayerSpec, block_checksums, recorded  # noqa: E402
from pdcheck.testing.gpu import run_pair  # noqa: E402

pytestmark = pytest.mark.gpu  # two GPUs where there are two; else both ranks on one
DEADLINE_S = 60.0
PAIR_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Case:
    """One request: blocks `src_ids` of rank 0's caches go to blocks `dst_ids` of rank 1's."""

    layout: KVLayout
    dtype: torch.dtype
    layers: int
    src_blocks: int
    dst_blocks: int
    block_size: int
    heads: int
    dim: int
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    seed: int

    def shape(self, blocks: int) -> tuple[int, ...]:
        return {
            KVLayout.FLASH_ATTN: (2, blocks, self.block_size, self.heads, self.dim),
            KVLayout.FLASH_INFER: (blocks, 2, self.block_size, self.heads, self.dim),
            KVLayout.MLA: (blocks, self.block_size, self.dim),
            KVLayout.BLOCKS_FIRST: (blocks, self.heads, self.block_size, self.dim),
        }[self.layout]

    def caches(self, blocks: int, seed: int, device) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        if self.dtype.is_floating_point:
            made = [torch.randn(self.shape(blocks), generator=gen).to(self.dtype) for _ in range(self.layers)]
        else:
            made = [torch.randint(0, 256, self.shape(blocks), generator=gen).to(self.dtype) for _ in range(self.layers)]
        return [c.to(device) for c in made]

    def sent(self, device) -> list[torch.Tensor]:
        return [extract(c, self.layout, self.src_ids) for c in self.caches(self.src_blocks, self.seed, device)]


def random_case(layout: KVLayout, rng: random.Random, seed: int, blocks: int | None = None) -> Case:
    src_blocks, dst_blocks = blocks or rng.randint(3, 24), blocks or rng.randint(3, 24)
    count = rng.randint(1, min(src_blocks, dst_blocks))
    return Case(layout, rng.choice([torch.bfloat16, torch.float16, torch.float32, torch.uint8]), rng.randint(1, 4),
                src_blocks, dst_blocks, rng.choice([1, 3, 16]), rng.randint(1, 4), rng.choice([1, 3, 64, 128]),
                tuple(rng.sample(range(src_blocks), count)), tuple(rng.sample(range(dst_blocks), count)), seed)


def layout_cases(seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = [random_case(layout, rng, seed + i) for i, layout in enumerate(KVLayout)]
    return cases + [random_case(KVLayout.FLASH_ATTN, rng, seed + 9, blocks=2)]  # looks like FlashInfer's shape


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def land(case: Case, received: list[torch.Tensor], device) -> list[str]:
    """Inject into rank 1's caches; the chosen blocks must equal what was sent, others unchanged."""
    caches = case.caches(case.dst_blocks, case.seed + 1, device)
    before = [c.clone() for c in caches]
    for cache, blocks in zip(caches, received):
        inject(cache, case.layout, case.dst_ids, blocks)
    failures = []
    for layer, (cache, old, sent) in enumerate(zip(caches, before, case.sent(device))):
        if not torch.equal(bits(extract(cache, case.layout, case.dst_ids)), bits(sent)):
            failures.append(f"{case}: layer {layer}: received blocks differ from the sent ones")
        others = [b for b in range(num_blocks(cache, case.layout)) if b not in case.dst_ids]
        if not torch.equal(bits(extract(cache, case.layout, others)), bits(extract(old, case.layout, others))):
            failures.append(f"{case}: layer {layer}: a block outside {case.dst_ids} changed")
    return failures


def send_all(peer, cases: list[Case]) -> list[str]:
    """Post every request before waiting for any: they are all in flight together."""
    data = [case.sent(peer.device) for case in cases]
    transfers = [peer.send_blocks(d, recorded(torch.cuda.current_stream())) for d in data]
    for transfer in transfers:
        transfer.wait(DEADLINE_S)
    return []


def receive_all(peer, cases: list[Case]) -> list[str]:
    transfers = [peer.recv_blocks([LayerSpec.of(t) for t in case.sent(peer.device)]) for case in cases]
    failures = []
    for case, transfer in reversed(list(zip(cases, transfers))):
        failures += land(case, transfer.wait(DEADLINE_S), peer.device)
    return failures


def scenario_requests(peer, rank: int, cases: list[Case], one_at_a_time: bool) -> list[str]:
    groups = [[case] for case in cases] if one_at_a_time else [cases]
    exchange = send_all if rank == 0 else receive_all
    return [line for group in groups for line in exchange(peer, group)]


def scenario_bad_checksum(peer, rank: int, case: Case, layer: int, block: int) -> str:
    """Rank 0 sends one wrong checksum, then the same request right; rank 1 reports both."""
    data = case.sent(peer.device)
    if rank == 0:
        sums = block_checksums(data)
        sums[layer * len(case.src_ids) + block] += 1
        peer.send_blocks(data, recorded(torch.cuda.current_stream()), checksums=sums).wait(DEADLINE_S)
        peer.send_blocks(data, recorded(torch.cuda.current_stream())).wait(DEADLINE_S)
        return ""
    specs = [LayerSpec.of(t) for t in data]
    try:
        peer.recv_blocks(specs, block_ids=case.dst_ids).wait(DEADLINE_S)
        caught = "no ChecksumError"
    except ChecksumError as e:
        caught = str(e)
    return caught + " | then: " + " ".join(land(case, peer.recv_blocks(specs).wait(DEADLINE_S), peer.device))


def scenario_silent_peer(peer, rank: int, deadline_s: float) -> tuple[float, str]:
    """One request goes through, then rank 0 goes silent (run_pair keeps it alive until rank 1
    is done) while rank 1 waits for a second one."""
    data = [torch.ones(4, 16, device=peer.device)]
    if rank == 0:
        peer.send_blocks(data, recorded(torch.cuda.current_stream())).wait(DEADLINE_S)
        return 0.0, ""
    peer.recv_blocks([LayerSpec.of(data[0])]).wait(DEADLINE_S)
    transfer = peer.recv_blocks([LayerSpec.of(data[0])])
    start = time.monotonic()
    try:
        transfer.wait(deadline_s)
    except TimeoutError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, "no TimeoutError"


def test_blocks_arrive_bitwise_exact_in_every_layout_including_a_two_block_flash_attn_cache():
    cases = layout_cases(seed=11)
    _, failures = run_pair(scenario_requests, (cases, True), PAIR_TIMEOUT_S)
    assert not failures, "\n".join(failures)


def test_several_requests_in_flight_each_arrive_intact():
    rng = random.Random(5)
    cases = [random_case(rng.choice(list(KVLayout)), rng, seed=100 + i) for i in range(6)]
    _, failures = run_pair(scenario_requests, (cases, False), PAIR_TIMEOUT_S)
    assert not failures, "\n".join(failures)


def test_a_corrupted_block_is_named_by_its_checksum_and_the_peer_stays_usable():
    case = Case(KVLayout.BLOCKS_FIRST, torch.bfloat16, 3, 8, 10, 16, 2, 64, (0, 5, 2, 7), (9, 1, 4, 3), seed=3)
    _, report = run_pair(scenario_bad_checksum, (case, 1, 2), PAIR_TIMEOUT_S)
    caught, then = report.split(" | then: ")
    assert "layer 1 block 2 (id 4): checksum mismatch" in caught, caught
    assert then.strip() == "", then


def test_a_receive_from_a_peer_that_never_sends_times_out_at_its_deadline():
    deadline_s = 2.0
    _, (elapsed, message) = run_pair(scenario_silent_peer, (deadline_s,), PAIR_TIMEOUT_S)
    assert "not done by its deadline" in message, message
    assert deadline_s <= elapsed < deadline_s + 10, f"timed out after {elapsed:.1f}s for a {deadline_s}s deadline"

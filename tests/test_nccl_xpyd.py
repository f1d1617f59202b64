"""xPyD on the NCCL plane: 2 prefill worker halves (GPUs 0, 1) and 2 decode halves (GPUs 2, 3;
on fewer GPUs the ranks share them and meet over NCCL's socket transport: pdcheck.testing.gpu),
each in its own spawned process, one communicator per (prefill, decode) pair, every prefill
sending to every decode (P0>D0, P1>D0 is 2P1D, P0>D1 is 1P2D) with several requests in flight on
each decode at once, in GET and PUT.

Each prefill's caches hold content made from its own seed; each decode loads the requests of
both prefills into disjoint blocks and checks them bit for bit against what it rebuilds from
those seeds, and that no other block changed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pdcheck.cluster.instance import free_port  # noqa: E402
from pdcheck.connector.config import Mode, P2PConfig, Plane  # noqa: E402
from pdcheck.connector.layouts import KVLayout, extract  # noqa: E402
from pdcheck.connector.worker import LoadEntry, SaveEntry, WorkerHalf  # noqa: E402
from pdcheck.testing.gpu import PairError, Rank, run_ranks  # noqa: E402

pytestmark = pytest.mark.gpu  # four GPUs where there are four; else the ranks share them
PREFILLS, DECODES, LAYERS, BLOCKS = 2, 2, 3, 16
SHAPE = (BLOCKS, 2, 16, 64)  # BLOCKS_FIRST: [blocks, kv, block_size, head_dim x heads]
BARRIER_S, TIMEOUT_S = 60.0, 240.0


def caches(seed: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen).to(torch.bfloat16).to(device) for _ in range(LAYERS)]


def blocks(p: int, d: int) -> tuple[list[int], list[int]]:
    """Prefill p's blocks for decode d, and where decode d puts them (disjoint per prefill)."""
    src = [4 * d + p, 4 * d + p + 2, 9 + d]
    return src, [8 * p + 3 * d + i for i in range(3)]


def role(rank: int) -> tuple[str, int]:
    return ("prefill", rank) if rank < PREFILLS else ("decode", rank - PREFILLS)


def run_rank(rank: Rank, mode: Mode, ports: list[int]) -> list[str]:
    kind, index = role(rank.index)
    barrier, device = rank.barrier, torch.device("cuda", torch.cuda.current_device())
    half = WorkerHalf(P2PConfig(port=ports[rank.index], mode=mode, plane=Plane.NCCL, deadline_s=30.0))
    address = [f"127.0.0.1:{port}" for port in ports]
    try:
        barrier.wait(BARRIER_S)  # every server listening
        if kind == "prefill":
            for i, cache in enumerate(caches(index, device)):
                half.record_layer(f"layer{i}", cache)
            entries = [SaveEntry(f"p{index}d{d}", f"p{index}d{d}", blocks(index, d)[0], address[PREFILLS + d])
                       for d in range(DECODES)]
            half.save(entries)  # GET: offered; PUT: pushed, each decode's link receiving it
            barrier.wait(BARRIER_S)
            barrier.wait(BARRIER_S)  # decodes done
            return []
        mine = caches(100 + index, device)
        before = [c.clone() for c in mine]
        barrier.wait(BARRIER_S)
        entries = [LoadEntry(f"p{p}d{index}", f"p{p}d{index}", blocks(p, index)[1], address[p]) for p in range(PREFILLS)]
        half.load(entries, {f"layer{i}": c for i, c in enumerate(mine)})
        lines = [f"decode {index}: load errors on {sorted(e)}" for e in [half.take_load_errors()] if e]
        for p in range(PREFILLS):
            src, dst = blocks(p, index)
            for layer, (got, sent) in enumerate(zip(mine, caches(p, device))):
                if not torch.equal(extract(got, KVLayout.BLOCKS_FIRST, dst), extract(sent, KVLayout.BLOCKS_FIRST, src)):
                    lines.append(f"P{p}>D{index} layer {layer}: blocks {dst} differ from prefill {p}'s {src}")
        written = {b for p in range(PREFILLS) for b in blocks(p, index)[1]}
        others = [b for b in range(BLOCKS) if b not in written]
        for layer, (got, old) in enumerate(zip(mine, before)):
            if not torch.equal(extract(got, KVLayout.BLOCKS_FIRST, others), extract(old, KVLayout.BLOCKS_FIRST, others)):
                lines.append(f"decode {index} layer {layer}: a block outside {sorted(written)} changed")
        barrier.wait(BARRIER_S)
        return lines
    finally:
        half.close()


@pytest.mark.parametrize("mode", [Mode.GET, Mode.PUT], ids=lambda m: m.value)
def test_two_prefills_to_two_decodes_arrive_bitwise_exact(mode):
    ranks = PREFILLS + DECODES
    ports = [free_port() for _ in range(ranks)]
    reproduce = f"reproduce: pytest 'tests/test_nccl_xpyd.py' -k {mode.value}"
    try:
        lines = run_ranks(run_rank, (mode, ports), ranks, TIMEOUT_S, "pdcheck-xpyd")
    except (PairError, TimeoutError) as e:
        pytest.fail(f"{e}\n{reproduce}")
    problems = [line for found in lines.values() for line in found]
    assert not problems, "\n".join(problems) + f"\n{reproduce}"

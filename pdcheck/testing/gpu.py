"""Spawned ranks on GPUs: the harness of the NCCL tests and of the NCCL bench.

`run_ranks(fn, args, count)` runs fn(rank, *args) in `count` spawned processes, each put on its
GPU by `place` before fn runs, and owns them: every one has ended when it returns or raises.
A rank is handed a `Rank`: its index, the count, and a barrier and a mailbox shared by all.
`run_pair(fn, args)` is two ranks joined by an NcclPeer: fn(peer, rank, *args).

`place` puts rank r on GPU r where there are as many GPUs as ranks. With fewer, ranks share them
and meet over NCCL's socket transport on loopback (NCCL refuses two ranks of one communicator on
one GPU): every byte still goes through NCCL, but not over NVLink. `pairing` says which, in words.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from pdcheck.connector.nccl import NcclPeer
from pdcheck.connector.nccl_lib import make_unique_id

PEER_DEADLINE_S = 60.0
JOIN_S = 30.0
POLL_S = 0.5


class PairError(RuntimeError):
    """A rank failed (the message holds its traceback) or exited before reporting."""


@dataclass(frozen=True)
class Rank:
    """What a spawned rank is handed: its index, how many ranks there are, and what they share."""

    index: int
    count: int
    barrier: Any  # a Barrier(count) of the spawn context
    mailbox: Any  # a Queue of the spawn context: what one rank hands the others (an NCCL id)


def run_ranks(fn, args: tuple = (), count: int = 2, timeout_s: float = 300.0, name: str = "pdcheck-rank",
              wait_for: tuple[int, ...] | None = None) -> dict[int, Any]:
    """fn(rank, *args) in `count` spawned processes, rank r placed by `place(r, count)`. Returns
    the results reported, by rank, once every rank of `wait_for` (all by default) has reported; a
    rank's exception comes back as PairError, no report within timeout_s as TimeoutError."""
    ctx = torch.multiprocessing.get_context("spawn")
    results, barrier, mailbox = ctx.Queue(), ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(Rank(r, count, barrier, mailbox), fn, args, results),
                         name=f"{name}-rank{r}") for r in range(count)]
    wanted = set(range(count) if wait_for is None else wait_for)
    try:
        for p in procs:
            p.start()
        return collect(results, procs, wanted, time.monotonic() + timeout_s)
    finally:
        stop(procs)


def rank_main(rank: Rank, fn, args: tuple, results) -> None:
    try:
        place(rank.index, rank.count)
        results.put((rank.index, True, fn(rank, *args)))
    except BaseException:
        results.put((rank.index, False, traceback.format_exc()))


def place(rank: int, ranks: int = 2) -> int:
    """Make this process rank `rank` of `ranks` on its GPU, before its first NCCL communicator:
    GPU `rank` where there are that many GPUs. With fewer, ranks share them (rank % count) and each
    rank is a host of its own to NCCL (NCCL_HOSTID), so that ranks on one GPU, which NCCL refuses
    as duplicates, meet over its socket transport on loopback. Returns the GPU's index."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    count = torch.cuda.device_count()
    if count < ranks:
        os.environ["NCCL_HOSTID"] = f"pdcheck-rank-{rank}"
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torch.cuda.set_device(rank % count)
    return rank % count


def pairing(ranks: int = 2) -> str:
    """Where `place` puts `ranks` ranks on this machine, in words."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "no CUDA GPU"
    if count >= ranks:
        return f"GPUs 0-{ranks - 1}, one rank each"
    return f"{ranks} ranks on {count} GPU(s), over NCCL's socket transport on loopback (not NVLink)"


def collect(results, procs, wanted: set[int], deadline_at: float) -> dict[int, Any]:
    outcomes: dict[int, Any] = {}
    while not wanted <= set(outcomes):
        try:
            rank, ok, value = results.get(timeout=POLL_S)
        except queue.Empty:
            check_alive(procs, wanted - set(outcomes), deadline_at)
            continue
        if not ok:
            raise PairError(f"rank {rank} failed:\n{value}")
        outcomes[rank] = value
    return outcomes


def check_alive(procs, waiting: set[int], deadline_at: float) -> None:
    dead = [procs[r] for r in sorted(waiting) if procs[r].exitcode is not None]
    if dead:
        raise PairError(f"{dead[0].name} exited with code {dead[0].exitcode} before reporting")
    if time.monotonic() > deadline_at:
        raise TimeoutError(f"ranks {sorted(waiting)} did not report by their deadline")


def stop(procs) -> None:
    deadline_at = time.monotonic() + JOIN_S
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline_at - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_pair(fn, args: tuple = (), timeout_s: float = 300.0) -> list:
    """fn(peer, rank, *args) in two spawned ranks (`run_ranks`), rank r on GPU r, joined by an
    NcclPeer. Returns [rank 0's result, rank 1's]; a rank's exception comes back as PairError."""
    results = run_ranks(pair_rank, (fn, args, timeout_s), 2, timeout_s, "pdcheck-nccl")
    return [results[0], results[1]]


def pair_rank(rank: Rank, fn, args: tuple, timeout_s: float):
    unique_id = exchange_id(rank, timeout_s)
    peer = NcclPeer(unique_id, rank.index, torch.cuda.current_device(), min(PEER_DEADLINE_S, timeout_s))
    try:
        result = fn(peer, rank.index, *args)
        with contextlib.suppress(threading.BrokenBarrierError):
            rank.barrier.wait(timeout_s)  # neither rank aborts its end while the other still works
        return result
    finally:
        peer.close()


def exchange_id(rank: Rank, timeout_s: float) -> bytes:
    if rank.index == 0:
        unique_id = make_unique_id()
        for _ in range(rank.count - 1):
            rank.mailbox.put(unique_id)
        return unique_id
    return rank.mailbox.get(timeout=timeout_s)

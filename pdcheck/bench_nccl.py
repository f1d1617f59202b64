"""pdcheck's NCCL bench: the connector's NCCL path against raw NCCL, on two GPUs.

    python -m pdcheck.bench_nccl [--tokens 256 1024 4096] [--warmup 5] [--repeat 25] [--json PATH]

Rank 0 (GPU 0) sends and rank 1 (GPU 1) receives, with the same bytes in every mode:
- raw: the whole request as ONE bf16 message (one ncclSend / ncclRecv);
- connector: a Llama-8B-shaped request, 32 layers of [blocks, 2, 16, 8, 128] bf16 (4K tokens =
  16 MiB a layer), as per-layer tensors in one grouped call; the send waits on an event of the
  compute stream, receive buffers are allocated on the receive stream;
- connector+checksum: the same, with per-block checksums made beside the send and verified on
  the receive stream before the request counts as received.
The sender queues every send up front, so CUDA events on the receive stream around each request
time the transfer itself. Warm-up runs are dropped; the table shows medians of the timed runs.

`run_pair` owns the two spawned ranks; tests/test_nccl.py runs its scenarios through it too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from pdcheck.connector.nccl import LayerSpec, NcclPeer, make_unique_id, recorded

MODES = ("raw", "connector", "connector+checksum")
PEER_DEADLINE_S = 60.0
JOIN_S = 30.0


class PairError(RuntimeError):
    """A rank of a pair failed; the message holds its traceback."""


def run_pair(fn, args: tuple = (), timeout_s: float = 300.0) -> list:
    """fn(peer, rank, *args) in two spawned processes, rank r on GPU r, joined by an NcclPeer.
    Returns [rank 0's result, rank 1's]; a rank's exception comes back as PairError."""
    ctx = torch.multiprocessing.get_context("spawn")
    ids, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=pair_main, args=(rank, fn, args, ids, results, barrier, timeout_s),
                         name=f"pdcheck-nccl-rank{rank}") for rank in (0, 1)]
    try:
        for p in procs:
            p.start()
        return collect(results, procs, time.monotonic() + timeout_s)
    finally:
        stop(procs)


def pair_main(rank: int, fn, args: tuple, ids, results, barrier, timeout_s: float) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        torch.cuda.set_device(rank)
        peer = NcclPeer(exchange_id(rank, ids, timeout_s), rank, rank, min(PEER_DEADLINE_S, timeout_s))
        try:
            results.put((rank, True, fn(peer, rank, *args)))
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout_s)  # neither rank aborts its end while the other still works
        finally:
            peer.close()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def exchange_id(rank: int, ids, timeout_s: float) -> bytes:
    if rank == 0:
        unique_id = make_unique_id()
        ids.put(unique_id)
        return unique_id
    return ids.get(timeout=timeout_s)


def collect(results, procs, deadline_at: float) -> list:
    outcomes: dict[int, object] = {}
    while len(outcomes) < 2:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            check_alive(procs, deadline_at, outcomes)
            continue
        if not ok:
            raise PairError(f"rank {rank} failed:\n{value}")
        outcomes[rank] = value
    return [outcomes[0], outcomes[1]]


def check_alive(procs, deadline_at: float, outcomes: dict) -> None:
    dead = [p for p in procs if p.exitcode is not None and procs.index(p) not in outcomes]
    if dead:
        raise PairError(f"{dead[0].name} exited with code {dead[0].exitcode} before reporting")
    if time.monotonic() > deadline_at:
        raise TimeoutError(f"ranks {sorted({0, 1} - set(outcomes))} did not report by their deadline")


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


@dataclass(frozen=True)
class Case:
    """A request of `tokens` tokens for a Llama-8B-shaped model (8 KV heads of 128, bf16)."""

    tokens: int
    layers: int = 32
    block_size: int = 16
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return (self.tokens // self.block_size, 2, self.block_size, self.kv_heads, self.head_dim)

    @property
    def total_bytes(self) -> int:
        return self.layers * math.prod(self.layer_shape) * 2

    def data(self, device) -> list[torch.Tensor]:
        """The request's layers, the same on every GPU of one model (seeded by the size)."""
        gen = torch.Generator(device=device).manual_seed(self.tokens)
        return [torch.randn(self.layer_shape, generator=gen, device=device, dtype=torch.bfloat16)
                for _ in range(self.layers)]


def bench_rank(peer: NcclPeer, rank: int, tokens: tuple[int, ...], warmup: int, repeat: int) -> dict:
    times = {}
    for case in map(Case, tokens):
        layers = case.data(peer.device)
        torch.cuda.synchronize(peer.device)
        for mode in MODES:
            if rank == 0:
                send_runs(peer, layers, mode, warmup + repeat)
            else:
                times[f"{case.tokens}/{mode}"] = recv_runs(peer, layers, mode, warmup + repeat)[warmup:]
    return {"device": torch.cuda.get_device_name(peer.device), "times": times}


def send_runs(peer: NcclPeer, layers: list[torch.Tensor], mode: str, runs: int) -> None:
    if mode == "raw":
        flat = torch.cat([t.reshape(-1) for t in layers])
        peer.send_stream.wait_stream(torch.cuda.current_stream())
        for _ in range(runs):
            peer.post_one("ncclSend", flat, peer.send_stream)
        peer.await_event(recorded(peer.send_stream), time.monotonic() + PEER_DEADLINE_S)
        return
    compute = torch.cuda.current_stream()
    transfers = [peer.send_blocks(layers, recorded(compute), verify=mode.endswith("checksum")) for _ in range(runs)]
    for transfer in transfers:
        transfer.wait(PEER_DEADLINE_S)


def recv_runs(peer: NcclPeer, expected: list[torch.Tensor], mode: str, runs: int) -> list[float]:
    times, got = [], None
    flat = None
    if mode == "raw":
        with torch.cuda.stream(peer.recv_stream):
            flat = torch.empty(sum(t.numel() for t in expected), dtype=torch.bfloat16, device=peer.device)
    specs = [LayerSpec.of(t) for t in expected]
    for _ in range(runs):
        start = timing_event(peer.recv_stream)
        if flat is not None:
            peer.post_one("ncclRecv", flat, peer.recv_stream)
        else:
            transfer = peer.recv_blocks(specs, verify=mode.endswith("checksum"))
        end = timing_event(peer.recv_stream)
        peer.await_event(end, time.monotonic() + PEER_DEADLINE_S)
        got = [flat] if flat is not None else transfer.wait(PEER_DEADLINE_S)
        times.append(start.elapsed_time(end))
    want = [torch.cat([t.reshape(-1) for t in expected])] if flat is not None else expected
    if not all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want)):
        raise AssertionError(f"{mode}: received bytes differ from the sent ones")
    return times


def timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def gib_per_s(nbytes: int, ms: float) -> float:
    return nbytes / 2**30 / (ms / 1000)


def rows(times: dict, tokens: tuple[int, ...]) -> list[dict]:
    table = []
    for case in map(Case, tokens):
        median = {mode: statistics.median(times[f"{case.tokens}/{mode}"]) for mode in MODES}
        rate = {mode: gib_per_s(case.total_bytes, ms) for mode, ms in median.items()}
        table.append({"tokens": case.tokens, "layers": case.layers, "layer_mib": case.total_bytes / case.layers / 2**20,
                      "total_mib": case.total_bytes / 2**20, "runs": len(times[f"{case.tokens}/raw"]),
                      "median_ms": median, "gib_s": rate,
                      "ratio": {m: rate[m] / rate["raw"] for m in MODES[1:]}})
    return table


def render(table: list[dict], device: str) -> str:
    lines = [f"NCCL plane vs raw NCCL, GPU 0 -> GPU 1 ({device}); medians of {table[0]['runs']} runs",
             f"{'tokens':>6} {'layers x MiB':>12} {'total MiB':>9} {'raw GiB/s':>9} {'conn GiB/s':>10} {'ratio':>6} "
             f"{'conn+sum GiB/s':>14} {'ratio':>6}"]
    for r in table:
        g, q = r["gib_s"], r["ratio"]
        lines.append(f"{r['tokens']:>6} {r['layers']:>4} x {r['layer_mib']:<5g} {r['total_mib']:>9g} {g['raw']:>9.1f} "
                     f"{g['connector']:>10.1f} {q['connector']:>6.1%} {g['connector+checksum']:>14.1f} "
                     f"{q['connector+checksum']:>6.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdcheck.bench_nccl", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        print(f"bench_nccl: needs 2 CUDA GPUs, found {gpus}", file=sys.stderr)
        return 2
    tokens = tuple(args.tokens)
    try:
        result = run_pair(bench_rank, (tokens, args.warmup, args.repeat), args.timeout)[1]
    except (PairError, TimeoutError) as e:
        print(f"bench_nccl: {e}", file=sys.stderr)
        return 1
    table = rows(result["times"], tokens)
    print(render(table, result["device"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": result["device"], "rows": table, "times_ms": result["times"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

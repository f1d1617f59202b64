"""pdcheck's NCCL bench: the connector's NCCL path against raw NCCL, on two GPUs.

    python -m pdcheck.bench.nccl [--tokens 256 1024 4096 16384] [--warmup 5] [--repeat 25] [--json PATH]

Rank 0 (GPU 0) sends and rank 1 (GPU 1) receives the same bytes in every mode:
- raw: the whole request as ONE bf16 message (one ncclSend / ncclRecv);
- grouped: its 32 layers as 32 messages in one NCCL group, into buffers made once (NCCL alone);
- connector: a Llama-8B-shaped request, 32 layers of [blocks, 2, 16, 8, 128] bf16 (4K tokens =
  16 MiB a layer) through `NcclPeer.send_blocks` / `recv_blocks`: one grouped call, the send
  waiting on a compute-stream event, the receive buffer allocated on the receive stream;
- connector+checksum: the same with per-block checksums made beside the send and verified on
  the receive stream before the request counts as received.
Each mode is timed two ways with CUDA events on the receive stream: streamed (WINDOW requests in
flight, the time between consecutive ends: bandwidth) and single (one request at a time, from
before the receive is posted: latency, the receiver's host enqueue included). The sender queues
every send up front. Warm-up requests are dropped; the tables show medians.

The two ranks are spawned and placed by pdcheck.testing.gpu (`run_pair`), as in the NCCL tests.
On a machine of one GPU both ranks share it and meet over NCCL's socket transport instead (NCCL
refuses two ranks of one communicator on one GPU): the bench then times loopback sockets, not
NVLink, and its header says so.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from pdcheck.connector.nccl import LayerSpec, NcclPeer, block_checksums, recorded, request_buffer
from pdcheck.testing.gpu import PairError, pairing, run_pair

MODES = ("raw", "grouped", "connector", "connector+checksum")
MEASURES = ("streamed", "single")
WINDOW = 4
PEER_DEADLINE_S = 60.0


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
        """The request's layers, as views of one staging buffer (the connector's save path writes
        each layer's blocks into it); the same on every GPU of one model (seeded by the size)."""
        gen = torch.Generator(device=device).manual_seed(self.tokens)
        shape = (self.layers, *self.layer_shape)
        return list(torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).unbind(0))


def bench_rank(peer: NcclPeer, rank: int, tokens: tuple[int, ...], warmup: int, repeat: int) -> dict:
    times, checksums = {}, {}
    for case in map(Case, tokens):
        layers = case.data(peer.device)
        flat = torch.cat([t.reshape(-1) for t in layers])
        torch.cuda.synchronize(peer.device)
        for measure in MEASURES:
            for mode in MODES:
                if rank == 0:
                    send_runs(peer, layers, flat, mode, warmup + repeat + 1)
                else:
                    runs = receive(peer, layers, flat, mode, measure, warmup + repeat + 1)
                    times[f"{case.tokens}/{measure}/{mode}"] = runs[warmup:warmup + repeat]
                    if measure == "single":
                        times[f"{case.tokens}/post_ms/{mode}"] = runs[-repeat:]
        if rank == 1:
            checksums[case.tokens] = checksum_ms(peer, layers)
    return {"device": torch.cuda.get_device_name(peer.device), "times": times, "checksum_ms": checksums}


def send_runs(peer: NcclPeer, layers: list[torch.Tensor], flat: torch.Tensor, mode: str, runs: int) -> None:
    """Queue every send up front: the receiver never waits for the sender's host."""
    if mode in ("raw", "grouped"):
        peer.send_stream.wait_stream(torch.cuda.current_stream())
        for _ in range(runs):
            peer.post_group("ncclSend", [flat] if mode == "raw" else layers, peer.send_stream)
        peer.await_event(recorded(peer.send_stream), time.monotonic() + PEER_DEADLINE_S)
        return
    compute = torch.cuda.current_stream()
    transfers = [peer.send_blocks(layers, recorded(compute), verify=mode.endswith("checksum")) for _ in range(runs)]
    for transfer in transfers:
        transfer.wait(PEER_DEADLINE_S)


def receive(peer: NcclPeer, expected: list[torch.Tensor], flat: torch.Tensor, mode: str, measure: str,
            runs: int) -> list[float]:
    specs = [LayerSpec.of(t) for t in expected]
    with torch.cuda.stream(peer.recv_stream):  # the baselines' buffers, made once
        views = [torch.empty_like(flat)] if mode == "raw" else request_buffer(specs, peer.device)[1]
    post = functools.partial(post_recv, peer, mode, specs, views)
    ends_on = peer.sum_stream if mode == "connector+checksum" else peer.recv_stream  # where a request is done
    times, got = (streamed if measure == "streamed" else one_at_a_time)(peer, post, ends_on, runs)
    want = [flat] if mode == "raw" else expected
    if not all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want)):
        raise AssertionError(f"{mode}: received bytes differ from the sent ones")
    return times


def post_recv(peer: NcclPeer, mode: str, specs: list[LayerSpec], views: list[torch.Tensor]):
    if mode in ("raw", "grouped"):
        peer.post_group("ncclRecv", views, peer.recv_stream)
        return views
    return peer.recv_blocks(specs, verify=mode.endswith("checksum"))


def finish(peer: NcclPeer, posted, end: torch.cuda.Event) -> list[torch.Tensor]:
    peer.await_event(end, time.monotonic() + PEER_DEADLINE_S)
    return posted if isinstance(posted, list) else posted.wait(PEER_DEADLINE_S)


def one_at_a_time(peer: NcclPeer, post, ends_on, runs: int) -> tuple[list[float], list[torch.Tensor]]:
    """From before the receive is posted to its end: the receiver's host enqueue counts. Also
    the host's milliseconds to post each request (they follow the GPU times in the list)."""
    times, host, got = [], [], []
    for _ in range(runs):
        start, began = timing_event(peer.recv_stream), time.perf_counter()
        posted = post()
        end = timing_event(ends_on)
        host.append((time.perf_counter() - began) * 1000)
        got = finish(peer, posted, end)
        times.append(start.elapsed_time(end))
    return times + host, got


def streamed(peer: NcclPeer, post, ends_on, runs: int) -> tuple[list[float], list[torch.Tensor]]:
    """WINDOW requests in flight; a request's time is the gap between consecutive ends."""
    ends, pending, got = [], collections.deque(), []
    for _ in range(runs):
        if len(pending) == WINDOW:
            got = finish(peer, *pending.popleft())
        posted = post()
        ends.append(timing_event(ends_on))
        pending.append((posted, ends[-1]))
    while pending:
        got = finish(peer, *pending.popleft())
    return [a.elapsed_time(b) for a, b in zip(ends, ends[1:])], got


def checksum_ms(peer: NcclPeer, layers: list[torch.Tensor]) -> dict:
    """Time of a request's checksums, layers in separate allocations (one kernel each, launch
    bound) and in one buffer (one kernel), back to back on an idle GPU."""
    apart = [t.clone() for t in layers]
    return {"per_layer": gpu_ms(lambda: block_checksums(apart)), "one_kernel": gpu_ms(lambda: block_checksums(layers))}


def gpu_ms(fn, runs: int = 20) -> float:
    fn()
    stream = torch.cuda.current_stream()
    start = timing_event(stream)
    for _ in range(runs):
        fn()
    end = timing_event(stream)
    end.synchronize()
    return start.elapsed_time(end) / runs


def timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def rows(result: dict, tokens: tuple[int, ...]) -> list[dict]:
    table = []
    for case, measure in itertools.product(map(Case, tokens), MEASURES):
        median = {m: statistics.median(result["times"][f"{case.tokens}/{measure}/{m}"]) for m in MODES}
        rate = {m: case.total_bytes / 2**30 / (ms / 1000) for m, ms in median.items()}
        post_ms = {m: statistics.median(result["times"][f"{case.tokens}/post_ms/{m}"]) for m in MODES}
        table.append({"tokens": case.tokens, "measure": measure, "layers": case.layers, "post_ms": post_ms,
                      "layer_mib": case.total_bytes / case.layers / 2**20, "total_mib": case.total_bytes / 2**20,
                      "median_ms": median, "gib_s": rate, "ratio": {m: rate[m] / rate["raw"] for m in MODES[1:]},
                      "checksum_ms": result["checksum_ms"][case.tokens]})
    return table


GOALS = {4096: 0.95, 1024: 0.80}  # streamed connector / raw, by tokens


def goal_lines(table: list[dict], on_gpus_of_their_own: bool) -> list[str]:
    """The streamed connector's share of raw NCCL against its goal, where the run has that size.
    The goals are for GPUs of their own (NVLink): a run over sockets only says how it would read."""
    where = "" if on_gpus_of_their_own else "; over loopback sockets, not the NVLink the goal is for"
    return [f"goal at {r['tokens']} tokens, streamed: connector {r['ratio']['connector']:.1%} of raw "
            f"(goal {GOALS[r['tokens']]:.0%}: {'met' if r['ratio']['connector'] >= GOALS[r['tokens']] else 'missed'}"
            f"{where})" for r in table if r["measure"] == "streamed" and r["tokens"] in GOALS]


def render(table: list[dict], device: str, repeat: int, pairs: str = "GPUs 0-1, one rank each") -> str:
    lines = [f"NCCL plane vs raw NCCL, rank 0 -> rank 1 on {pairs} ({device}); "
             f"GiB/s from medians of {repeat} requests",
             f"streamed: {WINDOW} requests in flight, time between consecutive ends; "
             "single: one at a time, from before the receive is posted",
             f"{'tokens':>6} {'measure':>8} {'layers x MiB':>12} {'raw':>6} {'grouped':>12} {'connector':>13} "
             f"{'conn+checksum':>13}  checksum ms (per layer / one kernel)"]
    for r in table:
        g, q, c = r["gib_s"], r["ratio"], r["checksum_ms"]
        cells = " ".join(f"{g[m]:>6.1f} {q[m]:>6.1%}" for m in MODES[1:])
        lines.append(f"{r['tokens']:>6} {r['measure']:>8} {r['layers']:>4} x {r['layer_mib']:<5g} {g['raw']:>6.1f} "
                     f"{cells}  {c['per_layer']:.3f} / {c['one_kernel']:.3f}")
    lines.append("receiver host ms to post one request (" + ", ".join(MODES) + "): " + "; ".join(
        f"{r['tokens']}: " + " / ".join(f"{r['post_ms'][m]:.3f}" for m in MODES) for r in table[::len(MEASURES)]))
    return "\n".join(lines + goal_lines(table, pairs.startswith("GPUs")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdcheck.bench.nccl", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 1:
        print("bench_nccl: needs a CUDA GPU (two for NVLink figures), found none", file=sys.stderr)
        return 2
    tokens = tuple(args.tokens)
    try:
        result = run_pair(bench_rank, (tokens, args.warmup, args.repeat), args.timeout)[1]
    except (PairError, TimeoutError) as e:
        print(f"bench_nccl: {e}", file=sys.stderr)
        return 1
    table, pairs = rows(result, tokens), pairing()
    print(render(table, result["device"], args.repeat, pairs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": result["device"], "pairing": pairs, "rows": table, "times_ms": result["times"]}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

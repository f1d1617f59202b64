"""`pdcheck bench proxy`: the latency the PD proxy adds to a request, on loopback.

Fake prefill and decode backends (pdcheck.testing.fake_backend's `FakeBackend`: tiny aiohttp
servers that answer a fixed completion and `kv_transfer_params` at once) register with a proxy
by heartbeat. The same
request is then sent `--requests` times straight to the decode backend and `--requests` times
through the proxy (prefill leg, then decode leg), interleaved, one at a time, after a warm-up.
Printed: p50 and p99 of both, and the added latency (proxy minus direct, per percentile), in ms.
The target is an added p50 of at most 2 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from pdcheck.proxy.heartbeat import Heartbeat, HeartbeatSender
from pdcheck.proxy.server import Proxy, ProxySettings
from pdcheck.testing.fake_backend import FakeBackend

MODEL = "fake-model"
TARGET_ADDED_P50_MS = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def time_requests(direct_url: str, proxy_url: str, count: int, warmup: int) -> tuple[list[float], list[float]]:
    """Interleaved (direct, proxied) timings in seconds, one request at a time."""
    body = json.dumps({"model": MODEL, "prompt": "the same prompt every time", "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json"}
    timings: tuple[list[float], list[float]] = ([], [])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        for i in range(warmup + count):
            for url, times in zip((direct_url, proxy_url), timings):
                started = time.perf_counter()
                async with client.post(f"{url}/v1/completions", data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status
                if i >= warmup:
                    times.append(time.perf_counter() - started)
    return timings


def registered(proxy_url: str) -> dict[str, list[dict[str, Any]]]:
    """The proxy's registry, as GET /instances answers it."""
    with urllib.request.urlopen(f"{proxy_url}/instances", timeout=5) as response:
        return json.load(response)


def wait_registered(proxy_url: str, deadline_s: float = 5.0) -> None:
    """Until the proxy has at least one instance of each role."""
    until = time.monotonic() + deadline_s
    while not all(registered(proxy_url).values()):
        if time.monotonic() > until:
            raise RuntimeError(f"backends not registered with the proxy after {deadline_s} s")
        time.sleep(0.02)


def bench_proxy(args, stack, console: Console) -> int:
    params = {"do_remote_prefill": True, "transfer_key": "k", "remote_prefill_cached_tokens": 0}
    prefill = stack.enter_context(FakeBackend("prefill", kv_transfer_params=params))
    decode = stack.enter_context(FakeBackend("decode"))
    proxy = Proxy(ProxySettings(heartbeat_interval_s=0.5, timeout_s=5.0)).start()
    stack.callback(proxy.stop)
    for role, backend in (("prefill", prefill), ("decode", decode)):
        beat = Heartbeat(role=role, http_address=backend.address, kv_address="127.0.0.1:1", model=MODEL)
        sender = HeartbeatSender(beat, proxy.heartbeat_address, interval_s=0.5).start()
        stack.callback(sender.stop)
    wait_registered(proxy.url)
    direct, proxied = asyncio.run(time_requests(decode.server.url, proxy.url, args.requests, args.warmup))
    report(console, direct, proxied)
    return 0


def report(console: Console, direct: list[float], proxied: list[float]) -> None:
    table = Table(title=f"pdcheck bench proxy: {len(direct)} sequential requests each, interleaved (ms)")
    for column in ("path", "p50", "p99", "mean"):
        table.add_column(column, justify="left" if column == "path" else "right")
    rows = {"decode backend, direct": direct, "through the proxy (2 legs)": proxied}
    for name, values in rows.items():
        ms = [v * 1000 for v in values]
        table.add_row(name, f"{percentile(ms, 0.5):.3f}", f"{percentile(ms, 0.99):.3f}", f"{statistics.fmean(ms):.3f}")
    added = {q: (percentile(proxied, q) - percentile(direct, q)) * 1000 for q in (0.5, 0.99)}
    table.add_row("added by the proxy", f"{added[0.5]:.3f}", f"{added[0.99]:.3f}", "")
    Console().print(table)
    verdict = "met" if added[0.5] <= TARGET_ADDED_P50_MS else "MISSED"
    console.print(f"target added p50 <= {TARGET_ADDED_P50_MS} ms: {verdict} ({added[0.5]:.3f} ms)")

"""Owners: an aiohttp application served from a thread of its own, and the PD proxy built on it.

`AppThread` runs one application on host:port (0: any free port) with its own event loop.
`start()` returns once the socket listens, or raises what stopped it; `stop()` closes the
socket, gives in-flight requests `grace_s`, runs the app's cleanup and joins the thread, all
within its deadline. `Proxy` is the HTTP app (pdcheck.proxy.http) plus the heartbeat listener
in one AppThread, so tests and cluster fixtures own the whole proxy through start/stop, and
`run_foreground` serves it for `pdcheck proxy` until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import zmq
from aiohttp import web

from pdcheck.errors import BadInput
from pdcheck.proxy.heartbeat import HeartbeatListener, Instances
from pdcheck.proxy.http import ProxyApp
from pdcheck.proxy.policies import POLICIES, Policy, RoundRobin, SeededRandom
from pdcheck.proxy.registry import Registry


class AppThread:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 name: str = "pdcheck-http", grace_s: float = 1.0):
        self.app, self.host, self.port, self.grace_s = app, host, port, grace_s
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self.serve()), name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, deadline_s: float = 10.0) -> AppThread:
        self.thread.start()
        if not self.ready.wait(deadline_s):
            self.stop()
            raise RuntimeError(f"{self.thread.name}: not listening after {deadline_s} s")
        if self.error is not None:
            self.thread.join(deadline_s)
            raise self.error
        return self

    async def serve(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self.app, shutdown_timeout=self.grace_s, access_log=None)
        try:
            try:
                await runner.setup()
                await web.TCPSite(runner, self.host, self.port).start()
                self.port = runner.addresses[0][1]
            except Exception as e:
                self.error = e
                return
            finally:
                self.ready.set()
            await self.stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self, deadline_s: float = 5.0) -> None:
        if self.thread.is_alive() and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.stopping.set)
            except RuntimeError:  # the loop closed meanwhile: the thread is ending anyway
                pass
        if self.thread.ident is not None:
            self.thread.join(deadline_s)
        if self.thread.is_alive():
            raise RuntimeError(f"{self.thread.name} did not stop within {deadline_s} s")


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_port: int = 0
    heartbeat_interval_s: float = 1.0  # how often silent instances are expired
    expiry_s: float = 3.0  # an instance silent this long is dropped
    timeout_s: float = 30.0  # connect, and between two reads, on each upstream leg

    def __post_init__(self):
        for name in ("port", "heartbeat_port"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 65536:
                raise BadInput(f"{name} {value!r}: expected 0..65535")
        for name in ("heartbeat_interval_s", "expiry_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise BadInput(f"{name} {getattr(self, name)!r}: must be positive")


class Proxy:
    """The PD proxy: routes by `policy` (default round-robin) over the instances found by
    heartbeat; `registry` may be a mutant from pdcheck.mutants.proxy. `instances` and the policy
    belong to the proxy's thread once started: read the registry through GET /instances."""

    def __init__(self, settings: ProxySettings = ProxySettings(), policy: Policy | None = None,
                 prefill_params: dict[str, Any] | None = None, registry: Registry | None = None):
        self.settings = settings
        self.instances = Instances(registry or Registry(settings.expiry_s))
        self.listener = HeartbeatListener(self.instances, settings.host, settings.heartbeat_port,
                                          settings.heartbeat_interval_s)
        app = ProxyApp(self.instances, policy or RoundRobin(), prefill_params, settings.timeout_s).app()
        app.cleanup_ctx.append(self.listener.running)
        self.server = AppThread(app, settings.host, settings.port, name="pdcheck-proxy")

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def heartbeat_address(self) -> str:
        return f"{self.settings.host}:{self.listener.port}"

    def start(self, deadline_s: float = 10.0) -> Proxy:
        try:
            self.server.start(deadline_s)
        except (OSError, zmq.ZMQError) as e:
            raise BadInput(f"proxy cannot listen on {self.settings.host}: {e}") from None
        return self

    def stop(self, deadline_s: float = 5.0) -> None:
        self.server.stop(deadline_s)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def make_policy(name: str, seed: int) -> Policy:
    return SeededRandom(seed) if POLICIES[name] is SeededRandom else POLICIES[name]()


def run_foreground(args, stack, console) -> int:
    """`pdcheck proxy`: serve until Ctrl-C or SIGTERM (the CLI turns both into exceptions)."""
    settings = ProxySettings(host=args.host, port=args.port, heartbeat_port=args.heartbeat_port,
                             timeout_s=args.timeout_s)
    proxy = Proxy(settings, make_policy(args.policy, args.seed)).start()
    stack.callback(proxy.stop)
    console.print(f"pdcheck proxy: {proxy.url} (heartbeats on {proxy.heartbeat_address}, policy {args.policy})")
    while proxy.server.thread.is_alive():
        time.sleep(0.5)
    console.print("pdcheck proxy: the server thread ended")
    return 1

"""Heartbeat discovery: every instance announces itself to the proxy once an interval.

Wire: one msgpack-encoded `Heartbeat` per ZMQ message, from a PUSH socket (the instance) to the
proxy's PULL socket. Heartbeats are one-way: nobody waits for an answer, so PUSH/PULL fits and
ROUTER/DEALER would only add a reply to ignore. The sender connects with ZMQ_IMMEDIATE and sends
without blocking, so while the proxy is away a heartbeat is dropped, not queued: a proxy that
comes back never receives a stale burst, and the next interval's heartbeat takes its place.

`Instances` is what the proxy knows: the registry (join order, expiry) and each member's last
heartbeat (its KV address and model). `HeartbeatListener` feeds it and expires silent members
every interval. The listener runs on the proxy's event loop, so the registry is only ever
touched from that loop's thread. A malformed message is logged, counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from typing import Literal

import msgspec
import zmq
import zmq.asyncio

from pdcheck.errors import BadInput
from pdcheck.proxy.registry import Member, Registry

log = logging.getLogger("pdcheck.proxy")
ROLES = ("prefill", "decode")
ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):(\d{1,5})")


def check_address(what: str, address: str) -> str:
    """`address` if it is host:port with a port in 1..65535, else BadInput naming `what`."""
    match = ADDRESS.fullmatch(address)
    if not match or not 0 < int(match[2]) < 65536:
        raise BadInput(f"{what} {address!r}: expected host:port")
    return address


class Heartbeat(msgspec.Struct, frozen=True):
    role: Literal["prefill", "decode"]
    http_address: str
    kv_address: str | None
    model: str

    def __post_init__(self):
        check_address("http_address", self.http_address)
        if self.kv_address is not None:
            check_address("kv_address", self.kv_address)
        if not self.model:
            raise BadInput("model: must not be empty")


ENCODER, DECODER = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Heartbeat)


class HeartbeatSender:
    """Sends `heartbeat` to the proxy's heartbeat address every `interval_s`, from its own thread,
    until stop(). The thread owns its ZMQ context and socket and closes both on the way out."""

    def __init__(self, heartbeat: Heartbeat, proxy_address: str, interval_s: float = 1.0):
        if interval_s <= 0:
            raise BadInput(f"interval_s {interval_s!r}: must be positive")
        self.heartbeat, self.interval_s = heartbeat, interval_s
        self.proxy_address = check_address("proxy heartbeat address", proxy_address)
        self.sent = self.dropped = 0
        self.stopping = threading.Event()
        name = f"pdcheck-heartbeat-{heartbeat.role}-{heartbeat.http_address}"
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> HeartbeatSender:
        self.thread.start()
        return self

    def run(self) -> None:
        payload = ENCODER.encode(self.heartbeat)
        with zmq.Context() as context, context.socket(zmq.PUSH) as socket:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.SNDHWM, 1)
            socket.connect(f"tcp://{self.proxy_address}")
            while not self.stopping.is_set():
                self.send(socket, payload)
                self.stopping.wait(self.interval_s)

    def send(self, socket: zmq.Socket, payload: bytes) -> None:
        """Send once the connection is up (waiting at most half an interval), else drop."""
        try:
            if socket.poll(int(self.interval_s * 500), zmq.POLLOUT):
                socket.send(payload, zmq.NOBLOCK)
                self.sent += 1
                return
        except zmq.Again:
            pass
        self.dropped += 1

    def stop(self, deadline_s: float = 5.0) -> None:
        self.stopping.set()
        self.thread.join(deadline_s)
        if self.thread.is_alive():
            raise RuntimeError(f"{self.thread.name} did not stop within {deadline_s} s")


class Instances:
    """The registry plus each member's last heartbeat, keyed by (role, http address)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.latest: dict[tuple[str, str], Heartbeat] = {}

    def note(self, heartbeat: Heartbeat) -> bool:
        """Record a heartbeat; True if the instance (re)joined with it."""
        self.latest[heartbeat.role, heartbeat.http_address] = heartbeat
        return self.registry.heartbeat(heartbeat.role, heartbeat.http_address)

    def expire(self) -> list[Member]:
        dropped = self.registry.expire()
        for member in dropped:
            self.latest.pop((member.role, member.address), None)
        return dropped

    def addresses(self, role: str, model: str) -> list[str]:
        """The role's members serving `model`, in join order."""
        return [a for a in self.registry.addresses(role) if self.latest[role, a].model == model]

    def get(self, role: str, address: str) -> Heartbeat:
        return self.latest[role, address]

    def models(self) -> list[str]:
        return sorted({self.latest[r, a].model for r in ROLES for a in self.registry.addresses(r)})

    def snapshot(self) -> dict[str, list[dict]]:
        """The registry in routing order, as JSON-ready dicts."""
        return {r: [msgspec.to_builtins(self.latest[r, a]) for a in self.registry.addresses(r)] for r in ROLES}


class HeartbeatListener:
    """The proxy's PULL socket on host:port (0: any free port), feeding `instances`; silent
    members are expired every `interval_s`. Started and stopped on the proxy's event loop."""

    def __init__(self, instances: Instances, host: str, port: int, interval_s: float):
        if interval_s <= 0:
            raise BadInput(f"heartbeat interval_s {interval_s!r}: must be positive")
        self.instances, self.host, self.port, self.interval_s = instances, host, port, interval_s
        self.rejected = 0
        self.task: asyncio.Task | None = None

    async def running(self, _app=None):
        """An aiohttp cleanup context: listening between startup and cleanup."""
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(f"tcp://{self.host}:{self.port or '*'}")
            self.port = int(socket.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
            self.task = asyncio.create_task(self.listen(socket), name="pdcheck-heartbeat-listener")
            yield
        finally:
            if self.task is not None:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
            socket.close(0)
            context.term()

    async def listen(self, socket: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        next_expiry = loop.time() + self.interval_s
        while True:
            if await socket.poll(max(0.0, next_expiry - loop.time()) * 1000, zmq.POLLIN):
                self.receive(await socket.recv_multipart())
            if loop.time() >= next_expiry:
                for member in self.instances.expire():
                    log.warning("%s instance %s expired: no heartbeat", member.role, member.address)
                next_expiry = loop.time() + self.interval_s

    def receive(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise BadInput(f"{len(frames)} frames, expected 1")
            heartbeat = DECODER.decode(frames[0])
        except (msgspec.DecodeError, BadInput) as e:
            self.rejected += 1
            log.warning("ignored a malformed heartbeat: %s", e)
            return
        if self.instances.note(heartbeat):
            log.info("%s instance %s joined (model %s)", heartbeat.role, heartbeat.http_address, heartbeat.model)

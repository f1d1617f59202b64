"""An in-memory, deterministic transport for the connector core: the protocol model's world.

The real core runs unchanged on it: KVHandler answers control requests and data connections,
KVClient (any subclass) transfers, Outbox and Inbox hold KV, TcpPlane's methods move it. What
is fake is only what sits under them:
- time and threads (pdcheck.testing.actors): the Loop's clock (a FakeClock) that every deadline
  reads, and the real code's threads run one at a time by the Loop, each until it waits on this
  transport (a poll, a recv, an Inbox wait), so a run is a function of the driver's steps alone;
- `Network`: every control message and every chunk of a data stream waits in `pending` until
  the driver delivers, loses, duplicates or reorders it. Control messages (ZMQ) may be lost,
  duplicated and delivered in any order; a data connection (TCP) keeps its order, and losing
  one of its chunks stalls it for good. `crash(owner)` kills a peer: its actors unwind, its
  sockets vanish (its peers' data connections are reset), messages to it are dropped.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
from collections import deque
from typing import Any, Callable

from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.config import P2PConfig
from pdcheck.connector.planes import TcpPlane
from pdcheck.connector.protocol import encode
from pdcheck.connector.tcp import KVClient, KVHandler
from pdcheck.testing.actors import Condition, Loop


@dataclasses.dataclass(eq=False)
class Packet:
    """One message in flight: a control request (to an Endpoint), a control reply (to a Dealer),
    or a chunk of a data stream (to a Conn; b"" is the sender's close)."""

    to: Any
    frames: list[bytes]
    reply_to: Dealer | None = None

    @property
    def is_control(self) -> bool:
        return not isinstance(self.to, Conn)


@dataclasses.dataclass(eq=False)
class Endpoint:
    """A server incarnation: a peer's address, its data port and its handler, until it crashes."""

    address: str
    data_port: int
    handler: KVHandler
    alive: bool = True


class Frame:
    """What zmq's recv_multipart(copy=False) returns per frame: its bytes."""

    def __init__(self, data: bytes):
        self.bytes = data


class Dealer:
    """A client's control socket to one address (the part of zmq.DEALER that KVClient uses)."""

    def __init__(self, network: Network, address: str, owner: str):
        self.network, self.address, self.owner = network, address, owner
        self.replies: deque[list[bytes]] = deque()
        self.closed = False

    def send_multipart(self, frames, copy: bool = True) -> None:
        self.network.send(Packet(self.network.endpoints[self.address], [bytes(f) for f in frames], self))

    def send(self, frame) -> None:
        self.send_multipart([frame])

    def poll(self, timeout_ms: int) -> int:
        if not self.replies and timeout_ms > 0:
            self.network.loop.block(lambda: bool(self.replies), timeout_ms / 1000)
        return int(bool(self.replies))

    def recv_multipart(self, copy: bool = True) -> list[Frame]:
        return [Frame(f) for f in self.replies.popleft()]

    def close(self, linger: int | None = None) -> None:
        self.closed = True
        self.replies.clear()


class Conn:
    """One end of a data connection (the part of socket.socket that stream and KVClient use)."""

    def __init__(self, network: Network, owner: str):
        self.network, self.owner = network, owner
        self.peer: Conn | None = None
        self.buffer = bytearray()
        self.timeout: float | None = None
        self.closed = self.eof = self.reset = self.stalled = False

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def setsockopt(self, *args) -> None:
        return None

    def sendall(self, data) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "send on a closed data connection")
        if self.reset or self.peer.closed:
            raise BrokenPipeError(errno.EPIPE, "the peer closed the data connection")
        if not self.stalled:
            self.network.send(Packet(self.peer, [bytes(data)]))

    def has_news(self) -> bool:
        return bool(self.buffer) or self.eof or self.reset or self.closed

    def readable(self) -> bool:
        """What a server's data loop waits on (its select): bytes, the end, or a reset."""
        self.network.loop.block(self.has_news)
        return True

    def recv_into(self, view) -> int:
        if not self.has_news():
            self.network.loop.block(self.has_news, self.timeout)
        if self.closed:
            raise OSError(errno.EBADF, "recv on a closed data connection")
        if self.buffer:
            n = min(len(view), len(self.buffer))
            view[:n] = self.buffer[:n]
            del self.buffer[:n]
            return n
        if self.reset:
            raise ConnectionResetError(errno.ECONNRESET, "the peer crashed")
        if self.eof:
            return 0
        raise TimeoutError("timed out")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send_fin()

    def send_fin(self) -> None:
        if not (self.stalled or self.reset or self.peer.closed):
            self.network.send(Packet(self.peer, [b""]))


class Network:
    """Peers' endpoints, sockets and the messages in flight between them (module docstring)."""

    def __init__(self, loop: Loop):
        self.loop = loop
        self.pending: list[Packet] = []
        self.endpoints: dict[str, Endpoint] = {}
        self.dealers: list[Dealer] = []
        self.conns: list[Conn] = []
        self.ports = itertools.count(1)

    def listen(self, address: str, handler: Callable[[int], KVHandler]) -> KVHandler:
        """A new incarnation of the server at `address`: `handler(data_port)` answers for it."""
        port = next(self.ports)
        self.endpoints[address] = Endpoint(address, port, handler(port))
        return self.endpoints[address].handler

    def dealer(self, address: str, owner: str) -> Dealer:
        dealer = Dealer(self, address, owner)
        self.dealers.append(dealer)
        return dealer

    def dial(self, port: int, owner: str) -> Conn:
        """A data connection from `owner` to the live endpoint with data port `port`; the server's
        end is answered by the handler's own loop (KVHandler.answer_connection) in an actor."""
        endpoint = next((e for e in self.endpoints.values() if e.data_port == port and e.alive), None)
        if endpoint is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"no server on data port {port}")
        mine, theirs = Conn(self, owner), Conn(self, endpoint.address)
        mine.peer, theirs.peer = theirs, mine
        self.conns += [mine, theirs]

        def serve() -> None:
            endpoint.handler.answer_connection(theirs, theirs.readable)
            theirs.close()

        self.loop.spawn(endpoint.address, f"{endpoint.address}-data-{port}", serve)
        return mine

    def send(self, packet: Packet) -> None:
        self.pending.append(packet)

    # -- the driver's moves ----------------------------------------------------------------
    def deliver(self, i: int) -> None:
        """Deliver pending[i]; for a data chunk, the oldest chunk pending on its connection."""
        packet = self.pending[i]
        if not packet.is_control:
            packet = next(p for p in self.pending if p.to is packet.to)
        self.pending.remove(packet)
        if isinstance(packet.to, Endpoint):
            if packet.to.alive:
                reply = packet.to.handler.answer([Frame(f) for f in packet.frames])
                self.send(Packet(packet.reply_to, [encode(reply)]))
        elif isinstance(packet.to, Dealer):
            if not packet.to.closed:
                packet.to.replies.append(packet.frames)
        elif not (packet.to.closed or packet.to.reset):
            packet.to.eof |= packet.frames == [b""]
            packet.to.buffer += packet.frames[0]

    def lose(self, i: int) -> None:
        """Lose pending[i]; a data chunk stalls its connection (it and all later chunks vanish)."""
        packet = self.pending.pop(i)
        if not packet.is_control:
            packet.to.peer.stalled = True
            self.pending = [p for p in self.pending if p.to is not packet.to]

    def duplicate(self, i: int) -> None:
        """Send a control message twice (a data connection never duplicates)."""
        if self.pending[i].is_control:
            self.pending.append(dataclasses.replace(self.pending[i]))

    def crash(self, owner: str) -> None:
        """`owner` dies: its server, sockets and actors go; its peers' connections to it reset."""
        if owner in self.endpoints:
            self.endpoints[owner].alive = False
        for dealer in self.dealers:
            if dealer.owner == owner:
                dealer.close()
        for conn in self.conns:
            if conn.owner == owner:
                conn.closed = conn.peer.reset = True
        self.pending = [p for p in self.pending if getattr(p.to, "owner", getattr(p.to, "address", None)) != owner]
        self.dealers = [d for d in self.dealers if not d.closed]
        self.conns = [c for c in self.conns if not (c.closed and c.peer.closed)]
        self.loop.crash(owner)


class InMemory:
    """Mixin for a KVClient (or a variant of it): its sockets are the Network's."""

    network: Network

    def connect(self, address: str) -> Dealer:
        self.sockets[address] = self.network.dealer(address, owner=self.name)
        return self.sockets[address]

    def dial(self, host: str, port: int, timeout: float) -> Conn:
        return self.network.dial(port, owner=self.name)


@functools.cache
def in_memory(client: type[KVClient]) -> type[KVClient]:
    return type(f"InMemory{client.__name__}", (InMemory, client), {})


@dataclasses.dataclass(frozen=True)
class Core:
    """The classes of the core a MemoryPlane is built from: the reference's, or a mutant's."""

    outbox: type = Outbox
    inbox: type = Inbox
    handler: type = KVHandler
    client: type = KVClient


class MemoryPlane(TcpPlane):
    """TcpPlane's transfers (stage, offer, push, pull, take, finished) on a Network: the server is
    the core's handler behind an Endpoint, the client the core's client class on the Network."""

    def __init__(self, config: P2PConfig, network: Network, core: Core = Core()):
        self.config, clock = config, network.loop.clock
        self.outbox = core.outbox(config.hold_s, clock=clock)
        self.inbox = core.inbox(config.buffer_bytes, config.spill_bytes, config.hold_s, clock=clock,
                                condition=lambda: Condition(network.loop))
        self.server = network.listen(config.address, lambda port: core.handler(self.outbox, self.inbox,
                                                                               config.deadline_s, port, clock=clock))
        self.client = in_memory(core.client)(None, config.address, config.buffer_bytes + config.spill_bytes,
                                             clock=clock)
        self.client.network = network

    def close(self) -> None:
        self.client.close()

"""The NCCL plane's server side: its control thread (NcclServer) and one Link per client.

A Link owns the server's end of one client's NcclPeer and answers that client's announces in
arrival order, posting each accepted transfer before it reads the next, so both ends post the
same transfers in the same order (pdcheck.connector.nccl_plane says why that matters). What an
announce means (what to send or receive) is the plane's: `plane.accept(message)` answers it and
gives the Op to post. The server knows the plane only as a ServedPlane (what it reads of it), so
this module does not import pdcheck.connector.nccl_plane, which builds on it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import zmq

from pdcheck.connector.buffers import Inbox
from pdcheck.connector.config import P2PConfig
from pdcheck.connector.nccl import NcclPeer
from pdcheck.connector.nccl_lib import NcclError
from pdcheck.connector.protocol import (
    ErrorReply, Hello, Message, ProtocolError, Pull, Push, Welcome, decode, encode,
)

log = logging.getLogger("pdcheck.connector")
POLL_S = 0.05
SHAKE_HANDS_AGAIN = "no live NCCL peer for this client: shake hands again"
FAILURES = (TimeoutError, NcclError, ProtocolError)


@dataclass(frozen=True)
class Op:
    """A Link's half of one accepted transfer, and what undoes it if it fails."""

    name: str
    run: Callable[[NcclPeer], None]
    failed: Callable[[Exception], None]


class ServedPlane(Protocol):
    """What the server and its Links use of the plane they serve (NcclPlane is one)."""

    config: P2PConfig
    context: zmq.Context
    inbox: Inbox
    device: torch.device

    def accept(self, message: Pull | Push) -> tuple[Message, Op]:
        """The answer to an announce and the post that goes with it; raises to refuse it."""
        ...


def transfer_key(message: Message) -> str | None:
    return message.blocks.transfer_key if isinstance(message, Push) else getattr(message, "transfer_key", None)


class NcclServer:
    """The plane's control socket (ROUTER), on one thread: a handshake makes a Link for its
    client (retiring that client's earlier ones); every other announce goes to the announcing
    client's Link, whose answers come back over an inproc socket and go out from this thread.
    Stopping it stops and joins its Links."""

    def __init__(self, plane: ServedPlane):
        self.plane = plane
        self.socket = plane.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{plane.config.address}")
        self.replies_address = f"inproc://pdcheck-nccl-replies-{id(self)}"
        self.replies = plane.context.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(self.replies_address)
        self.links: dict[bytes, Link] = {}
        self.retired: list[Link] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, name=f"pdcheck-nccl-control-{plane.config.address}",
                                       daemon=True)

    def start(self) -> NcclServer:
        self.thread.start()
        return self

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                for ready, _ in poller.poll(int(POLL_S * 1000)):
                    if ready is self.replies:
                        self.socket.send_multipart(self.replies.recv_multipart(copy=False), copy=False)
                    else:
                        identity, *frames = self.socket.recv_multipart(copy=False)
                        self.route(identity.bytes, frames)
                self.plane.inbox.expire()
        finally:
            self.retire(lambda link: True)
            for link in self.retired:
                link.thread.join(self.plane.config.deadline_s + 1)
            self.replies.close()
            self.socket.close()

    def route(self, identity: bytes, frames) -> None:
        answer = self.answer(identity, frames)
        if answer is not None:
            self.socket.send_multipart([identity, encode(answer)], copy=False)

    def answer(self, identity: bytes, frames) -> Message | None:
        """The answer to a message, or None where the client's Link will answer it."""
        key = None
        try:
            message = decode(frames[0].bytes)
            key = transfer_key(message)
            if len(frames) != 1:
                raise ProtocolError(f"{len(frames) - 1} data frames on the control socket")
            if isinstance(message, Hello):
                return self.welcome(identity, message)
            if not isinstance(message, Pull | Push):
                raise ProtocolError(f"unexpected {type(message).__name__}")
        except ProtocolError as e:
            log.warning("refused a peer's message: %s", e)
            return ErrorReply(transfer_key=key, message=str(e))
        if identity not in self.links:
            return ErrorReply(transfer_key=key, message=SHAKE_HANDS_AGAIN)
        self.links[identity].submit(message)
        return None

    def welcome(self, identity: bytes, hello: Hello) -> Welcome:
        if hello.nccl_id is None or len(hello.nccl_id) != 128:
            raise ProtocolError(f"{hello.peer}: this peer's data plane is nccl: a handshake needs a 128-byte NCCL id")
        self.retire(lambda link: link.name == hello.peer or link.identity == identity)
        self.links[identity] = Link(self.plane, identity, hello, self.replies_address).start()
        return Welcome(data_port=0)

    def retire(self, matches: Callable[[Link], bool]) -> None:
        """Stop the matching Links (each ends after the transfer it is in); forget ended ones."""
        for identity, link in list(self.links.items()):
            if matches(link):
                link.stop()
                self.retired.append(self.links.pop(identity))
        self.retired = [link for link in self.retired if link.thread.is_alive()]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(2 * self.plane.config.deadline_s + 2)


class Link:
    """The server's end of one client's communicator. Its thread makes the NcclPeer (rank 1),
    then, for each of the client's announces in arrival order, answers it and posts the accepted
    transfer, so that each answer follows the end of the transfer before it."""

    def __init__(self, plane: ServedPlane, identity: bytes, hello: Hello, replies_address: str):
        self.plane, self.identity, self.name = plane, identity, hello.peer
        self.messages: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.run, args=(hello.nccl_id, replies_address),
                                       name=f"pdcheck-nccl-link-{hello.peer}", daemon=True)

    def start(self) -> Link:
        self.thread.start()
        return self

    def submit(self, message: Pull | Push) -> None:
        self.messages.put(message)

    def stop(self) -> None:
        self.messages.put(None)

    def run(self, nccl_id: bytes, replies_address: str) -> None:
        torch.cuda.set_device(self.plane.device)
        replies = self.plane.context.socket(zmq.PUSH)
        replies.setsockopt(zmq.LINGER, 0)
        replies.setsockopt(zmq.SNDTIMEO, int(self.plane.config.deadline_s * 1000))
        replies.connect(replies_address)
        peer = self.connect(nccl_id)
        try:
            while (message := self.messages.get()) is not None:
                peer = self.handle(peer, message, replies)
        finally:
            replies.close()
            if peer is not None:
                peer.close()

    def connect(self, nccl_id: bytes) -> NcclPeer | None:
        try:
            return NcclPeer(nccl_id, 1, self.plane.device, self.plane.config.deadline_s)
        except (TimeoutError, NcclError) as e:
            log.error("NCCL handshake with %s failed: %s", self.name, e)
            return None

    def handle(self, peer: NcclPeer | None, message: Pull | Push, replies: zmq.Socket) -> NcclPeer | None:
        """Answer one announce and post its transfer; returns the peer, or None once it is closed."""
        answer, op = ErrorReply(transfer_key(message), SHAKE_HANDS_AGAIN), None
        if peer is not None:
            try:
                answer, op = self.plane.accept(message)
            except (ProtocolError, BufferError) as e:
                log.warning("refused %s's %s: %s", self.name, type(message).__name__, e)
                answer = ErrorReply(transfer_key(message), str(e))
        with contextlib.suppress(zmq.Again):  # the server is stopping: the client's deadline ends it
            replies.send_multipart([self.identity, encode(answer)])
        return peer if op is None else self.post(peer, op)

    def post(self, peer: NcclPeer, op: Op) -> NcclPeer | None:
        try:
            op.run(peer)
            return peer
        except FAILURES as e:
            log.error("%s with %s failed; its NCCL peer is closed: %s", op.name, self.name, e)
            peer.close()
            op.failed(e)
            return None

"""The NCCL plane: control over ZMQ as on the TCP plane, KV bytes GPU to GPU over one NcclPeer
(pdcheck.connector.nccl) per client and server pair. The KV never leaves the GPU.

    client --Hello(nccl_id)-----------> server   the client makes the id (rank 0); the server
    client <--Welcome------------------ server   makes a Link for it (rank 1); both build the peer
  GET:  decode --Pull(key)--> prefill; prefill answers <--Blocks(key, ...)-- and posts the send;
        decode posts the matching receive.
  PUT, PUT_ASYNC: prefill --Push(Blocks)--> decode; decode answers <--Ack-- and posts the
        receive; prefill posts the send.

Streams: `stage` makes the per-block checksums on the saving thread's stream right after the
extract and records an event after them; the send waits for that event on the peer's send
stream. A receive is allocated and written on the peer's receive stream, and the data and its
checksum check are waited for before the KV is handed to the load, which injects it.

Posting order: NCCL matches a communicator's sends and receives in the order they are posted,
so both ends of a peer must post the same transfers in the same order. Here:
- One thread owns each NcclPeer and posts every transfer on it: on the client, the one thread
  that uses the client (pdcheck.connector.planes); on the server, the Link thread made at that
  client's handshake.
- A client announces one transfer at a time and posts its half only once the server accepted it.
  The Link gets the client's announces in the order they were sent (one ZMQ connection), and it
  answers each one only after the transfer before it has ended, then posts its half before it
  reads the next. A refused announce is posted on neither side. So the n-th post is the same
  transfer on both ends.
- Any failure after an accept (timeout, checksum mismatch, NCCL error, an answer the client
  refuses) closes the peer on the side that saw it. The client then drops its socket and peer, and
  shakes hands anew on its next transfer; a Link whose peer is closed answers every later
  announce with SHAKE_HANDS_AGAIN, on which the client drops its peer and retries once on a new
  one. A new handshake makes a new communicator, so no post of an old sequence meets a new one.
A failure ends the request by its deadline (TimeoutError or ProtocolError), so the load fails and
names its blocks; a push that fails on decode's side is recorded, so its load fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq

from pdcheck.connector import stream
from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.config import P2PConfig
from pdcheck.connector.nccl import LayerSpec, NcclPeer, block_checksums, recorded
from pdcheck.connector.nccl_lib import NcclError, make_unique_id
from pdcheck.connector.protocol import (
    Ack, Blocks, ErrorReply, Hello, Message, ProtocolError, Pull, Push, Welcome, decode, encode,
)
from pdcheck.connector.tcp import ErrorReplied, KVClient, payload_size

log = logging.getLogger("pdcheck.connector")
POLL_S = 0.05
SHAKE_HANDS_AGAIN = "no live NCCL peer for this client: shake hands again"
FAILURES = (TimeoutError, NcclError, ProtocolError)


@dataclass(frozen=True)
class Frame:
    """A request's KV as staged at save time; its send waits for `after`."""

    header: Blocks
    data: torch.Tensor  # [layers, blocks, *one_block] on the GPU
    checksums: torch.Tensor  # int64, one per block of each layer
    after: torch.cuda.Event  # recorded once the extract and the checksums are done


@dataclass(frozen=True)
class Op:
    """A Link's half of one accepted transfer, and what undoes it if it fails."""

    name: str
    run: Callable[[NcclPeer], None]
    failed: Callable[[Exception], None]


class NcclPlane:
    """The DataPlane over NCCL: this half's server (NcclServer) and its client (NcclClient)."""

    def __init__(self, config: P2PConfig, client_factory=None):
        if not torch.cuda.is_available():
            raise ValueError("plane 'nccl' needs CUDA KV caches, and this process sees no CUDA device; "
                             "use plane 'tcp' for KV caches in host memory")
        self.config = config
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.context = zmq.Context()
        self.outbox = Outbox(config.hold_s)
        self.inbox = Inbox(config.buffer_bytes, config.spill_bytes, config.hold_s)
        self.failures = Failures(config.hold_s)
        self.server = NcclServer(self).start()
        self.client = (client_factory or NcclClient)(self.context)
        self.client.name, self.client.max_bytes = config.address, config.buffer_bytes + config.spill_bytes
        self.client.device = self.device

    # -- prefill -----------------------------------------------------------------------------
    def stage(self, key: str, data: torch.Tensor) -> Frame:
        if data.device != self.device:
            raise ValueError(f"plane 'nccl' needs CUDA KV caches on this worker's {self.device}; "
                             f"{key} was extracted on {data.device}")
        checksums = block_checksums(list(data.unbind(0)))
        header = Blocks(transfer_key=key, dtype=str(data.dtype).removeprefix("torch."), shape=list(data.shape),
                        checksum=0)  # the per-block checksums travel with the data
        return Frame(header, data, checksums, recorded(torch.cuda.current_stream(self.device)))

    def offer(self, key: str, request_id: str, staged: Frame) -> None:
        self.outbox.put(key, request_id, staged)

    def push(self, address: str, key: str, staged: Frame) -> None:
        def transfer(deadline_at: float) -> None:
            peer = self.client.peer(address, deadline_at)
            accepted = self.client.announce(address, Push(staged.header), deadline_at, key)
            if not isinstance(accepted, Ack) or accepted.transfer_key != key:
                raise ProtocolError(f"{address} answered a push of {key} with {accepted}")
            self.send(peer, staged, stream.remaining(deadline_at))

        self.client.transfer(address, key, self.config.deadline_s, transfer)

    def send(self, peer: NcclPeer, frame: Frame, deadline_s: float) -> None:
        """Post `frame` on `peer` and wait until it has left: the seam where a variant changes what goes out."""
        peer.send_blocks(list(frame.data.unbind(0)), frame.after, checksums=frame.checksums).wait(deadline_s)

    # -- decode ------------------------------------------------------------------------------
    def pull(self, address: str, key: str) -> torch.Tensor:
        def transfer(deadline_at: float) -> torch.Tensor:
            peer = self.client.peer(address, deadline_at)
            header = self.client.announce(address, Pull(key), deadline_at, key)
            if not isinstance(header, Blocks) or header.transfer_key != key:
                raise ProtocolError(f"{address} answered a pull of {key} with {type(header).__name__}")
            if payload_size(header) > self.client.max_bytes:
                raise ProtocolError(f"{key}: {payload_size(header)} bytes exceed this half's {self.client.max_bytes}")
            return self.receive(peer, header, stream.remaining(deadline_at))

        return self.client.transfer(address, key, self.config.deadline_s, transfer)

    def take(self, key: str) -> torch.Tensor:
        deadline_at = time.monotonic() + self.config.deadline_s
        while (left := deadline_at - time.monotonic()) > 0:
            data = self.inbox.take(key, min(left, POLL_S))
            if data is not None:
                data.record_stream(torch.cuda.current_stream(self.device))  # injected on this thread's stream
                return data
            reason = self.failures.pop(key)
            if reason is not None:
                raise ProtocolError(f"{key}: the push failed on arrival: {reason}")
        raise TimeoutError(f"{key} was not pushed within {self.config.deadline_s}s")

    def receive(self, peer: NcclPeer, header: Blocks, deadline_s: float) -> torch.Tensor:
        """Post the receive of the KV `header` announces on `peer`; wait for it and its checksums."""
        transfer = peer.recv_blocks(layer_specs(header))
        transfer.wait(deadline_s)
        return transfer.base  # all layers alike: one [layers, blocks, *one_block] allocation

    # -- the server's half of a transfer, on the announcing client's Link thread -------------
    def accept(self, message: Pull | Push) -> tuple[Message, Op]:
        """The answer to an announce and the post that goes with it; raises to refuse it."""
        return self.accept_pull(message.transfer_key) if isinstance(message, Pull) else self.accept_push(message.blocks)

    def accept_pull(self, key: str) -> tuple[Blocks, Op]:
        frame = self.outbox.take(key)
        if frame is None:
            raise ProtocolError(f"unknown transfer key {key}")
        return frame.header, Op(f"send of {key}", lambda peer: self.send(peer, frame, self.config.deadline_s),
                                lambda error: None)

    def accept_push(self, header: Blocks) -> tuple[Ack, Op]:
        key, size = header.transfer_key, payload_size(header)
        layer_specs(header)  # refuses a shape that is not [layers, blocks, ...] before room is taken
        if self.inbox.is_reserved(key, size):
            raise ProtocolError(f"{key} is already being pushed")
        self.inbox.reserve(key, size, self.config.deadline_s)
        return Ack(key), Op(f"receive of {key}", lambda peer: self.arrived(peer, header),
                            lambda error: self.arrival_failed(key, error))

    def arrived(self, peer: NcclPeer, header: Blocks) -> None:
        self.inbox.put(header.transfer_key, self.receive(peer, header, self.config.deadline_s))

    def arrival_failed(self, key: str, error: Exception) -> None:
        self.inbox.release(key)
        self.failures.add(key, str(error))

    # -- bookkeeping -------------------------------------------------------------------------
    def finished(self) -> set[str]:
        return self.outbox.finished()

    def close(self) -> None:
        self.server.stop()
        self.client.close()
        self.context.term()


def layer_specs(header: Blocks) -> list[LayerSpec]:
    """What a receiver allocates for the KV a header announces, refusing shapes it cannot be."""
    payload_size(header)
    if len(header.shape) < 2 or header.shape[0] < 1:
        raise ProtocolError(f"{header.transfer_key}: shape {header.shape} is not [layers, blocks, ...]")
    return [LayerSpec(tuple(header.shape[1:]), getattr(torch, header.dtype))] * header.shape[0]


def transfer_key(message: Message) -> str | None:
    return message.blocks.transfer_key if isinstance(message, Push) else getattr(message, "transfer_key", None)


class Failures:
    """Why pushed KV failed on arrival, by key, until its load asks (or hold_s passes)."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.reasons: dict[str, tuple[str, float]] = {}

    def add(self, key: str, reason: str) -> None:
        with self.lock:
            now = time.monotonic()
            self.reasons = {k: v for k, v in self.reasons.items() if v[1] > now}
            self.reasons[key] = (reason, now + self.hold_s)

    def pop(self, key: str) -> str | None:
        with self.lock:
            reason = self.reasons.pop(key, None)
        return reason[0] if reason else None


class NcclServer:
    """The plane's control socket (ROUTER), on one thread: a handshake makes a Link for its
    client (retiring that client's earlier ones); every other announce goes to the announcing
    client's Link, whose answers come back over an inproc socket and go out from this thread.
    Stopping it stops and joins its Links."""

    def __init__(self, plane: NcclPlane):
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

    def __init__(self, plane: NcclPlane, identity: bytes, hello: Hello, replies_address: str):
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


class NcclClient(KVClient):
    """The plane's client, used by one thread at a time: the first transfer with a peer address
    shakes hands with a new NCCL id (this side is rank 0) and builds the NcclPeer; a failure drops
    both the socket and the peer."""

    def __init__(self, context: zmq.Context, name: str = "pdcheck", max_bytes: int = 1 << 40, device=None):
        super().__init__(context, name, max_bytes)
        self.device = device
        self.peers: dict[str, NcclPeer] = {}

    def peer(self, address: str, deadline_at: float) -> NcclPeer:
        if address not in self.peers:
            unique_id = make_unique_id()
            welcome = self.announce(address, Hello(self.name, nccl_id=unique_id), deadline_at, None)
            if not isinstance(welcome, Welcome):
                raise ProtocolError(f"{address} answered a handshake with {type(welcome).__name__}")
            self.peers[address] = NcclPeer(unique_id, 0, self.device, stream.remaining(deadline_at))
        return self.peers[address]

    def transfer(self, address: str, key: str, deadline_s: float, body):
        """Run one transfer by its deadline (once more on a new peer if the server lost ours)."""
        with torch.cuda.device(self.device):
            try:
                return self.rejoining(address, body, time.monotonic() + deadline_s)
            except ErrorReplied as e:
                raise ProtocolError(f"{address} refused {key}: {e}") from None
            except TimeoutError as e:
                self.drop(address)
                raise TimeoutError(f"{key} with {address}: {e}") from None
            except (NcclError, ProtocolError, OSError) as e:
                self.drop(address)
                raise ProtocolError(f"{key} with {address}: {e}") from None

    def rejoining(self, address: str, body, deadline_at: float):
        try:
            return body(deadline_at)
        except ErrorReplied as e:
            if str(e) != SHAKE_HANDS_AGAIN:
                raise
        log.info("%s has no live NCCL peer for %s: shaking hands again", address, self.name)
        self.drop(address)
        return body(deadline_at)

    def drop(self, address: str) -> None:
        super().drop(address)
        peer = self.peers.pop(address, None)
        if peer is not None:
            peer.close()

    def close(self) -> None:
        for address in set(self.sockets) | set(self.peers):
            self.drop(address)

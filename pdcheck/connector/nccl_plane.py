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
The server's side (its control thread and the Links) is pdcheck.connector.nccl_server.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
import zmq

from pdcheck.connector import stream
from pdcheck.connector.config import P2PConfig
from pdcheck.connector.nccl import LayerSpec, NcclPeer, block_checksums, recorded
from pdcheck.connector.nccl_lib import NcclError, make_unique_id
from pdcheck.connector.nccl_server import SHAKE_HANDS_AGAIN, NcclServer, Op
from pdcheck.connector.plane_base import PlaneBase
from pdcheck.connector.protocol import (
    Ack, Blocks, Hello, Message, ProtocolError, Pull, Push, Welcome,
)
from pdcheck.connector.tcp import ErrorReplied, KVClient, payload_size

log = logging.getLogger("pdcheck.connector")
POLL_S = 0.05


@dataclass(frozen=True)
class Frame:
    """A request's KV as staged at save time; its send waits for `after`."""

    header: Blocks
    data: torch.Tensor  # [layers, blocks, *one_block] on the GPU
    checksums: torch.Tensor  # int64, one per block of each layer
    after: torch.cuda.Event  # recorded once the extract and the checksums are done


class NcclPlane(PlaneBase):
    """The DataPlane over NCCL: this half's server (NcclServer) and its client (NcclClient)."""

    def __init__(self, config: P2PConfig, client_factory=None):
        if not torch.cuda.is_available():
            raise ValueError("plane 'nccl' needs CUDA KV caches, and this process sees no CUDA device; "
                             "use plane 'tcp' for KV caches in host memory")
        super().__init__(config)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.failures = Failures(config.hold_s)
        self.attach(NcclServer(self), (client_factory or NcclClient)(self.context))
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


def layer_specs(header: Blocks) -> list[LayerSpec]:
    """What a receiver allocates for the KV a header announces, refusing shapes it cannot be."""
    payload_size(header)
    if len(header.shape) < 2 or header.shape[0] < 1:
        raise ProtocolError(f"{header.transfer_key}: shape {header.shape} is not [layers, blocks, ...]")
    return [LayerSpec(tuple(header.shape[1:]), getattr(torch, header.dtype))] * header.shape[0]


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

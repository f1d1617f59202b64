"""The TCP plane: control messages and KV bytes over ZMQ (ROUTER server, DEALER clients).

`KVServer` owns one ROUTER socket on its own thread and answers peers: a Pull is served from
the Outbox, a Push is stored in the Inbox. `KVClient` sends one request and waits for its reply
with a deadline; a client belongs to one thread (ZMQ sockets are not thread-safe). Tensors go
as one raw frame, without a copy on the sending side (pyzmq sends the tensor's buffer).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import numpy as np

import torch
import zmq

from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.protocol import Ack, Blocks, ErrorReply, ProtocolError, Pull, Push, decode, encode

log = logging.getLogger("pdcheck.connector")
POLL_MS = 100


def checksum(data: np.ndarray) -> int:
    """A cheap content checksum (sum of 64-bit words, tail bytes and length): any change to
    one word changes it. Fast enough to run at memory speed on both sides of every transfer."""
    data = data.reshape(-1).view(np.uint8)
    aligned = len(data) // 8 * 8
    words = int(data[:aligned].view(np.uint64).sum(dtype=np.uint64))
    return (words + int(data[aligned:].sum()) + len(data)) % 2**64


def to_frame(key: str, tensor: torch.Tensor) -> tuple[Blocks, memoryview]:
    data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    header = Blocks(transfer_key=key, dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                    checksum=checksum(data))
    return header, memoryview(data)


def from_frame(header: Blocks, frame) -> torch.Tensor:
    """The tensor a data frame holds, checked against its header. It shares the frame's memory."""
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if checksum(np.frombuffer(buffer, dtype=np.uint8)) != header.checksum:
        raise ProtocolError(f"transfer {header.transfer_key}: checksum mismatch")
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"transfer {header.transfer_key}: unknown dtype {header.dtype!r}")
    count = 1
    for n in header.shape:
        count *= n
    if count * dtype.itemsize != len(buffer):
        raise ProtocolError(f"transfer {header.transfer_key}: {len(buffer)} bytes for shape {header.shape}")
    with warnings.catch_warnings():  # read-only memory: the tensor is only ever copied from
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(header.shape)


class KVServer:
    def __init__(self, context: zmq.Context, address: str, outbox: Outbox, inbox: Inbox):
        self.outbox, self.inbox = outbox, inbox
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{address}")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, name=f"pdcheck-kv-server-{address}", daemon=True)

    def start(self) -> KVServer:
        self.thread.start()
        return self

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopping.is_set():
            if poller.poll(POLL_MS):
                identity, *frames = self.socket.recv_multipart(copy=False)
                self.socket.send_multipart([identity, *self.answer(frames)], copy=False)
        self.socket.close()

    def answer(self, frames) -> list:
        key = None
        try:
            message = decode(frames[0].bytes)
            key = message.blocks.transfer_key if isinstance(message, Push) else getattr(message, "transfer_key", None)
            if isinstance(message, Pull):
                return self.serve_pull(message)
            if isinstance(message, Push) and len(frames) == 2:
                self.inbox.put(message.blocks.transfer_key, from_frame(message.blocks, frames[1]))
                return [encode(Ack(message.blocks.transfer_key))]
            raise ProtocolError(f"unexpected {type(message).__name__} with {len(frames) - 1} data frames")
        except (ProtocolError, BufferError) as e:
            log.warning("refused a peer's message: %s", e)
            return [encode(ErrorReply(transfer_key=key, message=str(e)))]

    def serve_pull(self, pull: Pull) -> list:
        frame = self.outbox.take(pull.transfer_key)
        if frame is None:
            raise ProtocolError(f"unknown transfer key {pull.transfer_key}")
        header, data = frame
        return [encode(header), data]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)


class KVClient:
    """Requests to peers from one thread; every wait has a deadline."""

    def __init__(self, context: zmq.Context):
        self.context = context
        self.sockets: dict[str, zmq.Socket] = {}

    def request(self, address: str, frames: list, deadline_s: float, key: str | None = None) -> list:
        """Send one request and return its reply. Replies about another transfer key (late or
        duplicated answers to earlier requests) are skipped, never taken as this one's."""
        socket = self.sockets.get(address) or self.connect(address)
        socket.send_multipart(frames, copy=False)
        end = time.monotonic() + deadline_s
        while socket.poll(max(0, int((end - time.monotonic()) * 1000))):
            reply = socket.recv_multipart(copy=False)
            message = decode(reply[0].bytes)
            if key is not None and getattr(message, "transfer_key", None) not in (None, key):
                log.warning("skipped a stale reply about %s while waiting for %s", message.transfer_key, key)
                continue
            if isinstance(message, ErrorReply):
                raise ProtocolError(f"{address} refused: {message.message}")
            return [message, *reply[1:]]
        self.drop(address)  # a late reply must not be read as the next request's
        raise TimeoutError(f"no reply from {address} within {deadline_s}s")

    def pull(self, address: str, key: str, deadline_s: float) -> torch.Tensor:
        header, *data = self.request(address, [encode(Pull(key))], deadline_s, key)
        if not isinstance(header, Blocks) or len(data) != 1 or header.transfer_key != key:
            raise ProtocolError(f"{address} answered a pull of {key} with {type(header).__name__}")
        return from_frame(header, data[0])

    def push(self, address: str, key: str, tensor: torch.Tensor, deadline_s: float) -> None:
        header, data = to_frame(key, tensor)
        (reply,) = self.request(address, [encode(Push(header)), data], deadline_s, key)
        if not isinstance(reply, Ack) or reply.transfer_key != key:
            raise ProtocolError(f"{address} answered a push of {key} with {reply}")

    def connect(self, address: str) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"tcp://{address}")
        self.sockets[address] = socket
        return socket

    def drop(self, address: str) -> None:
        self.sockets.pop(address).close()

    def close(self) -> None:
        for address in list(self.sockets):
            self.drop(address)

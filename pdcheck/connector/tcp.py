"""The TCP plane: control messages over ZMQ (ROUTER server, DEALER clients), KV bytes over
plain TCP data connections (pdcheck.connector.stream), as pdcheck.connector.protocol draws it.

`KVServer` owns a ROUTER socket on one thread (handshakes and announces), a data listener on
another, and one thread per accepted data connection (fetches and pushed bytes). `KVClient`
belongs to one thread (ZMQ sockets are not thread-safe): a transfer shakes hands once per peer,
announces itself on the control socket, then moves the bytes on the data connection, all
within one deadline. Bytes are written from the tensor's memory and read straight into the
receiving tensor; the sender's checksum (made at save time) is checked on arrival. `KVHandler`
is the server's answering logic without its sockets (the protocol model drives it in memory).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time

import torch
import zmq

from pdcheck.connector import stream
from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.protocol import (
    Ack, Blocks, ErrorReply, Fetch, Hello, Message, ProtocolError, Pull, Push, Welcome, decode, encode,
)

log = logging.getLogger("pdcheck.connector")
POLL_S = 0.1


def checksum(data: torch.Tensor) -> int:
    """A cheap content checksum (sum of 64-bit words, tail bytes and length): any change to
    one word changes it. Fast enough to run at memory speed on both sides of every transfer."""
    flat = data.reshape(-1).view(torch.uint8)
    aligned = flat.numel() // 8 * 8
    words = flat[:aligned] if flat.storage_offset() % 8 == 0 else flat[:aligned].clone()
    total = int(words.view(torch.int64).sum()) if aligned else 0
    return (total + int(flat[aligned:].sum()) + flat.numel()) % 2**64


def to_frame(key: str, tensor: torch.Tensor) -> tuple[Blocks, memoryview]:
    data = tensor.contiguous().view(torch.uint8).reshape(-1)
    header = Blocks(transfer_key=key, dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                    checksum=checksum(data))
    return header, memoryview(data.numpy())


def payload_size(header: Blocks) -> int:
    """The byte count a header announces, refusing dtypes and shapes no tensor has."""
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"transfer {header.transfer_key}: unknown dtype {header.dtype!r}")
    if any(n < 0 for n in header.shape):
        raise ProtocolError(f"transfer {header.transfer_key}: negative shape {header.shape}")
    count = 1
    for n in header.shape:
        count *= n
    return count * dtype.itemsize


def from_frame(header: Blocks, data: torch.Tensor) -> torch.Tensor:
    """The tensor the bytes `data` (flat uint8) hold, checked against their header. It shares
    their memory."""
    if payload_size(header) != data.numel():
        raise ProtocolError(f"transfer {header.transfer_key}: {data.numel()} bytes for shape {header.shape}")
    if checksum(data) != header.checksum:
        raise ProtocolError(f"transfer {header.transfer_key}: checksum mismatch")
    return data.view(getattr(torch, header.dtype)).reshape(header.shape)


class KVHandler:
    """What a server answers, without its sockets: control requests (`answer`: frames in, the
    reply out) and data connections (`answer_connection`). KVServer puts it on ZMQ and TCP;
    pdcheck.testing.memory_transport puts it on the protocol model's in-memory transport."""

    def __init__(self, outbox: Outbox, inbox: Inbox, deadline_s: float = 10.0, data_port: int = 0,
                 clock=time.monotonic):
        self.outbox, self.inbox, self.deadline_s, self.data_port = outbox, inbox, deadline_s, data_port
        self.clock = clock  # what every deadline is measured on: the protocol model passes its fake clock
        self.stopping = threading.Event()

    # -- control ---------------------------------------------------------------------------
    def answer(self, frames) -> Message:
        key = None
        try:
            message = decode(frames[0].bytes)
            key = message.blocks.transfer_key if isinstance(message, Push) else getattr(message, "transfer_key", None)
            if len(frames) != 1:
                raise ProtocolError(f"{len(frames) - 1} data frames on the control socket")
            if isinstance(message, Hello):
                if message.nccl_id is not None:
                    raise ProtocolError(f"{message.peer} offered NCCL: this peer's data plane is tcp")
                return Welcome(self.data_port)
            if isinstance(message, Pull):
                return self.announced(message.transfer_key)
            if isinstance(message, Push):
                self.inbox.reserve(key, payload_size(message.blocks), self.deadline_s)
                return Ack(key)
            raise ProtocolError(f"unexpected {type(message).__name__}")
        except (ProtocolError, BufferError) as e:
            log.warning("refused a peer's message: %s", e)
            return ErrorReply(transfer_key=key, message=str(e))

    def announced(self, key: str) -> Blocks:
        frame = self.outbox.peek(key)
        if frame is None:
            raise ProtocolError(f"unknown transfer key {key}")
        return frame[0]

    # -- data ------------------------------------------------------------------------------
    def answer_connection(self, conn: socket.socket, readable) -> None:
        """Answer one peer's data messages in order until it leaves, breaks the framing, or
        the server stops. `readable()` waits a while for the next message: true if one came."""
        try:
            while not self.stopping.is_set():
                if readable():
                    self.answer_data(conn, self.clock() + self.deadline_s)
        except ProtocolError as e:  # the framing is lost: say why, then hang up
            log.warning("closed a data connection: %s", e)
            with contextlib.suppress(OSError):
                stream.write(conn, ErrorReply(transfer_key=None, message=str(e)), self.clock() + POLL_S,
                             clock=self.clock)
        except OSError as e:
            log.info("closed a data connection: %s", e)

    def answer_data(self, conn: socket.socket, deadline_at: float) -> None:
        message = stream.read_message(conn, deadline_at, clock=self.clock)
        if isinstance(message, Fetch):
            frame = self.outbox.take(message.transfer_key)
            if frame is None:
                stream.write(conn, ErrorReply(message.transfer_key, f"unknown transfer key {message.transfer_key}"),
                             deadline_at, clock=self.clock)
            else:
                stream.write(conn, frame[0], deadline_at, payload=frame[1], clock=self.clock)
        elif isinstance(message, Blocks):
            stream.write(conn, self.receive(conn, message, deadline_at), deadline_at, clock=self.clock)
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} on a data connection")

    def receive(self, conn: socket.socket, header: Blocks, deadline_at: float) -> Message:
        """Read pushed bytes into a tensor of their own and store them where room was reserved."""
        key, size = header.transfer_key, payload_size(header)
        if not self.inbox.is_reserved(key, size):
            raise ProtocolError(f"{key}: {size} bytes pushed with no room reserved for them")
        data = torch.empty(size, dtype=torch.uint8)
        stream.read_into(conn, memoryview(data.numpy()), deadline_at, clock=self.clock)
        try:
            self.inbox.put(key, from_frame(header, data))
            return Ack(key)
        except (ProtocolError, BufferError) as e:
            self.inbox.release(key)
            log.warning("refused a peer's push: %s", e)
            return ErrorReply(transfer_key=key, message=str(e))


class KVServer(KVHandler):
    def __init__(self, context: zmq.Context, address: str, outbox: Outbox, inbox: Inbox, deadline_s: float = 10.0):
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{address}")
        self.listener = socket.create_server((address.rpartition(":")[0], 0))
        self.listener.settimeout(POLL_S)
        super().__init__(outbox, inbox, deadline_s, self.listener.getsockname()[1])
        self.threads = [threading.Thread(target=self.serve, name=f"pdcheck-kv-control-{address}", daemon=True),
                        threading.Thread(target=self.accept, name=f"pdcheck-kv-data-{address}", daemon=True)]

    def start(self) -> KVServer:
        for thread in self.threads:
            thread.start()
        return self

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopping.is_set():
            if poller.poll(int(POLL_S * 1000)):
                identity, *frames = self.socket.recv_multipart(copy=False)
                self.socket.send_multipart([identity, encode(self.answer(frames))], copy=False)
            self.inbox.expire()
        self.socket.close()

    def accept(self) -> None:
        connections = []
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self.serve_connection, args=(conn,), name="pdcheck-kv-conn", daemon=True)
            thread.start()
            connections = [t for t in connections if t.is_alive()] + [thread]
        self.listener.close()
        for thread in connections:
            thread.join(self.deadline_s)

    def serve_connection(self, conn: socket.socket) -> None:
        with conn, selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            self.answer_connection(conn, lambda: selector.select(POLL_S))

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.deadline_s + 1)


class KVClient:
    """Transfers to and from peers, from one thread; every wait has a deadline.

    A pulled tensor lives in this client's receive buffer: it is valid until the next pull."""

    def __init__(self, context: zmq.Context, name: str = "pdcheck", max_bytes: int = 1 << 40,
                 clock=time.monotonic):
        self.context, self.name, self.max_bytes, self.clock = context, name, max_bytes, clock
        self.sockets: dict[str, zmq.Socket] = {}
        self.data: dict[str, socket.socket] = {}
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def pull(self, address: str, key: str, deadline_s: float) -> torch.Tensor:
        def transfer(deadline_at: float) -> torch.Tensor:
            conn = self.channel(address, deadline_at)
            header = self.announce(address, Pull(key), deadline_at, key)
            if not isinstance(header, Blocks) or header.transfer_key != key:
                raise ProtocolError(f"{address} answered a pull of {key} with {type(header).__name__}")
            size = payload_size(header)
            if size > self.max_bytes:
                raise ProtocolError(f"{key}: {size} bytes exceed this receive buffer's {self.max_bytes}")
            stream.write(conn, Fetch(key), deadline_at, clock=self.clock)
            reply = stream.read_message(conn, deadline_at, clock=self.clock)
            if reply != header:
                raise ProtocolError(f"{address} sent {reply} for {key}, announced {header}")
            data = self.receive_buffer(size)
            self.recv_payload(conn, data, deadline_at)
            return self.unpack(header, data)

        return self.transfer(address, key, deadline_s, transfer)

    def push(self, address: str, key: str, tensor: torch.Tensor, deadline_s: float) -> None:
        header, payload = to_frame(key, tensor)

        def transfer(deadline_at: float) -> None:
            conn = self.channel(address, deadline_at)
            accepted = self.announce(address, Push(header), deadline_at, key)
            if not isinstance(accepted, Ack) or accepted.transfer_key != key:
                raise ProtocolError(f"{address} answered a push of {key} with {accepted}")
            self.send_payload(conn, header, payload, deadline_at)
            stored = stream.read_message(conn, deadline_at, clock=self.clock)
            if not isinstance(stored, Ack) or stored.transfer_key != key:
                raise ProtocolError(f"{address} did not store {key}: {stored}")

        self.transfer(address, key, deadline_s, transfer)

    def transfer(self, address: str, key: str, deadline_s: float, body):
        """Run one transfer by its deadline. On any failure both connections to the peer are
        dropped (a late or partial answer must not be read as the next transfer's)."""
        try:
            return self.attempt(address, self.clock() + deadline_s, body)
        except TimeoutError:
            self.drop(address)
            raise TimeoutError(f"{key} with {address}: no answer within {deadline_s}s") from None
        except OSError as e:
            self.drop(address)
            raise ProtocolError(f"{key} with {address}: data connection failed: {e}") from None
        except ErrorReplied as e:
            raise ProtocolError(f"{address} refused: {e}") from None
        except ProtocolError:
            self.drop(address)
            raise

    def attempt(self, address: str, deadline_at: float, body):
        """The transfer; if the peer has closed a data connection made for an earlier transfer
        (it restarted on the same address), shake hands and dial again, once, within the same
        deadline. A connection made for this transfer that fails is not tried again."""
        reused = address in self.data
        try:
            return body(deadline_at)
        except ConnectionError as e:
            if not reused:
                raise
            log.info("data connection to %s lost (%s): connecting again", address, e)
            self.drop(address)
            return body(deadline_at)

    # -- seams (pdcheck.faults.wire and pdcheck.mutants override these) --------------------
    def unpack(self, header: Blocks, data: torch.Tensor) -> torch.Tensor:
        """The pulled tensor, checked against its header (size and checksum)."""
        return from_frame(header, data)

    def announce(self, address: str, message: Message, deadline_at: float, key: str | None) -> Message:
        (reply,) = self.request(address, [encode(message)], stream.remaining(deadline_at, clock=self.clock), key)
        return reply

    def send_payload(self, conn: socket.socket, header: Blocks, payload: memoryview, deadline_at: float) -> None:
        stream.write(conn, header, deadline_at, payload=payload, clock=self.clock)

    def recv_payload(self, conn: socket.socket, data: torch.Tensor, deadline_at: float) -> None:
        stream.read_into(conn, memoryview(data.numpy()), deadline_at, clock=self.clock)

    # -- connections -----------------------------------------------------------------------
    def request(self, address: str, frames: list, deadline_s: float, key: str | None = None) -> list:
        """Send one control request and return its reply. Replies about another transfer key
        (late or duplicated answers to earlier requests) are skipped, never taken as this one's,
        and so is a Welcome while a transfer waits (a duplicated handshake's second answer)."""
        socket_ = self.sockets.get(address) or self.connect(address)
        socket_.send_multipart(frames, copy=False)
        end = self.clock() + deadline_s
        while socket_.poll(max(0, int((end - self.clock()) * 1000))):
            reply = socket_.recv_multipart(copy=False)
            message = decode(reply[0].bytes)
            if key is not None and (isinstance(message, Welcome)
                                    or getattr(message, "transfer_key", None) not in (None, key)):
                log.warning("skipped a stale %s while waiting for %s", type(message).__name__, key)
                continue
            if isinstance(message, ErrorReply):
                raise ErrorReplied(message.message)
            return [message, *reply[1:]]
        self.drop(address)
        raise TimeoutError(f"no reply from {address} within {deadline_s}s")

    def channel(self, address: str, deadline_at: float) -> socket.socket:
        """The data connection to a peer, made after a handshake on the first transfer."""
        if address not in self.data:
            welcome = self.announce(address, Hello(self.name), deadline_at, None)
            if not isinstance(welcome, Welcome):
                raise ProtocolError(f"{address} answered a handshake with {type(welcome).__name__}")
            host = address.rpartition(":")[0]
            self.data[address] = self.dial(host, welcome.data_port, stream.remaining(deadline_at, clock=self.clock))
        return self.data[address]

    def dial(self, host: str, port: int, timeout: float) -> socket.socket:
        """A data connection to a peer's data port (pdcheck.testing.memory_transport dials in memory)."""
        conn = socket.create_connection((host, port), timeout=timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def receive_buffer(self, size: int) -> torch.Tensor:
        if self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.uint8)
        return self.buffer[:size]

    def connect(self, address: str) -> zmq.Socket:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():  # from a peer's transfer parameters: refuse it by name
            raise ProtocolError(f"peer address {address!r} is not host:port")
        socket_ = self.context.socket(zmq.DEALER)
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.connect(f"tcp://{address}")
        self.sockets[address] = socket_
        return socket_

    def drop(self, address: str) -> None:
        if address in self.sockets:
            self.sockets.pop(address).close()
        if address in self.data:
            self.data.pop(address).close()

    def close(self) -> None:
        for address in set(self.sockets) | set(self.data):
            self.drop(address)


class ErrorReplied(ProtocolError):
    """The peer answered a control request with an ErrorReply (its message is the text)."""

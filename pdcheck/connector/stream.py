"""Framing on the TCP plane's data connections: plain sockets, because KV bytes are the bulk
of the traffic and a plain socket moves them faster than ZMQ can (`pdcheck bench tcp`).

A message is a 4-byte big-endian length, one msgpack message (pdcheck.connector.protocol),
then, after a `Blocks` header, exactly the bytes it describes. Every read and write finishes
by its deadline (a monotonic time) or raises TimeoutError; a peer that closes raises
ConnectionError; a frame that cannot be a message raises ProtocolError. Deadlines are measured on
the `clock` given (the protocol model passes its fake one), time.monotonic by default.
"""

from __future__ import annotations

import socket
import struct
import time

from pdcheck.connector.protocol import Message, ProtocolError, decode, encode

LENGTH = struct.Struct("!I")
MAX_MESSAGE_BYTES = 1 << 20  # a header, never KV


def remaining(deadline_at: float, clock=time.monotonic) -> float:
    left = deadline_at - clock()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def write(sock: socket.socket, message: Message, deadline_at: float, payload=None, clock=time.monotonic) -> None:
    body = encode(message)
    sock.settimeout(remaining(deadline_at, clock))
    sock.sendall(LENGTH.pack(len(body)) + body)
    if payload is not None:
        sock.settimeout(remaining(deadline_at, clock))
        sock.sendall(payload)  # since Python 3.5 the timeout bounds the whole sendall


def read_message(sock: socket.socket, deadline_at: float, clock=time.monotonic) -> Message:
    header = bytearray(LENGTH.size)
    read_into(sock, memoryview(header), deadline_at, clock)
    (size,) = LENGTH.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a {size}-byte message header on a data connection")
    body = bytearray(size)
    read_into(sock, memoryview(body), deadline_at, clock)
    return decode(bytes(body))


def read_into(sock: socket.socket, view: memoryview, deadline_at: float, clock=time.monotonic) -> None:
    """Fill `view` from the socket (no copy beyond the kernel's)."""
    received = 0
    while received < len(view):
        sock.settimeout(remaining(deadline_at, clock))
        n = sock.recv_into(view[received:])
        if n == 0:
            raise ConnectionError("peer closed the data connection")
        received += n

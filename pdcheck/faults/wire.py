"""Faults on the reference connector's wire, at its client seams (no connector code changes).

These are not inject/heal faults: each lives for one transfer. `FaultyClient` is a KVClient
whose transfers follow a schedule of WireFaults, one per transfer in order (then none): DROP
(the transfer never leaves: the caller's deadline passes), DELAY (it leaves late, inside the
deadline), DUPLICATE (its control announce is sent twice), CORRUPT (one byte of the payload,
sent or received, is flipped), TRUNCATE (the payload stops halfway and the data connection
closes), FAIL (the transfer fails before anything is sent, as a refused connection does). Every
fault applied is appended to `applied`. `UncheckedClient` is the same with the checksum check on
pulls left out: the tier's negative control.
"""

from __future__ import annotations

import enum
import socket
import time

import torch

from pdcheck.connector import stream
from pdcheck.connector.protocol import Fetch, ProtocolError, Pull, Push, encode
from pdcheck.connector.tcp import KVClient


class WireFault(enum.Enum):
    NONE = "none"
    DROP = "drop"
    DELAY = "delay"
    DUPLICATE = "duplicate"
    CORRUPT = "corrupt"
    TRUNCATE = "truncate"
    FAIL = "fail"


class FaultyClient(KVClient):
    def __init__(self, context, schedule: list[WireFault], delay_s: float = 0.05):
        super().__init__(context)
        self.schedule, self.delay_s = list(schedule), delay_s
        self.applied: list[WireFault] = []
        self.fault = WireFault.NONE

    def transfer(self, address: str, key: str, deadline_s: float, body):
        self.fault = self.schedule.pop(0) if self.schedule else WireFault.NONE
        self.applied.append(self.fault)
        if self.fault is WireFault.DROP:
            time.sleep(deadline_s)
            raise TimeoutError(f"{key} with {address}: no answer within {deadline_s}s (dropped)")
        if self.fault is WireFault.DELAY:
            time.sleep(self.delay_s)
        if self.fault is WireFault.FAIL:
            raise ProtocolError(f"{key} with {address}: data connection failed (injected)")
        return super().transfer(address, key, deadline_s, body)

    def announce(self, address, message, deadline_at, key):
        if self.fault is WireFault.DUPLICATE and isinstance(message, Pull | Push | Fetch):
            (self.sockets.get(address) or self.connect(address)).send(encode(message))
        return super().announce(address, message, deadline_at, key)

    def send_payload(self, conn, header, payload, deadline_at):
        if self.fault is WireFault.CORRUPT:
            payload = flip_one_byte(payload)
        if self.fault is WireFault.TRUNCATE:
            stream.write(conn, header, deadline_at, payload=memoryview(payload)[: len(payload) // 2])
            conn.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("the data connection closed mid-payload (truncated)")
        super().send_payload(conn, header, payload, deadline_at)

    def recv_payload(self, conn, data, deadline_at):
        if self.fault is WireFault.TRUNCATE:
            super().recv_payload(conn, data[: data.numel() // 2], deadline_at)
            raise ConnectionResetError("the data connection closed mid-payload (truncated)")
        super().recv_payload(conn, data, deadline_at)
        if self.fault is WireFault.CORRUPT and data.numel():
            data[data.numel() // 2] ^= 0x10


def flip_one_byte(frame) -> bytes:
    data = bytearray(frame)
    if data:
        data[len(data) // 2] ^= 0x10
    return bytes(data)


class UncheckedClient(FaultyClient):
    """A negative control for the wire-fault tier: pulls trust their bytes without the checksum
    (as a connector that skips verification does), so a corrupted payload is written in silently."""

    def unpack(self, header, data):
        return data.view(getattr(torch, header.dtype)).reshape(header.shape)

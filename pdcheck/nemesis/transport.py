"""Faults on the reference connector's wire, at its client seam (no connector code changes).

`FaultyClient` is a KVClient whose requests follow a schedule of faults, one per request in
order (then none): DROP (the request never leaves: the caller's deadline passes), DELAY (it
leaves late, inside the deadline), DUPLICATE (it leaves twice), CORRUPT (one byte of the
payload, sent or received, is flipped). Every fault applied is appended to `applied`.
"""

from __future__ import annotations

import enum
import time

from pdcheck.connector.tcp import KVClient


class Fault(enum.Enum):
    NONE = "none"
    DROP = "drop"
    DELAY = "delay"
    DUPLICATE = "duplicate"
    CORRUPT = "corrupt"


class FaultyClient(KVClient):
    def __init__(self, context, schedule: list[Fault], delay_s: float = 0.05):
        super().__init__(context)
        self.schedule, self.delay_s = list(schedule), delay_s
        self.applied: list[Fault] = []

    def request(self, address: str, frames: list, deadline_s: float, key: str | None = None) -> list:
        fault = self.schedule.pop(0) if self.schedule else Fault.NONE
        self.applied.append(fault)
        if fault is Fault.DROP:
            time.sleep(deadline_s)
            raise TimeoutError(f"no reply from {address} within {deadline_s}s (dropped)")
        if fault is Fault.DELAY:
            time.sleep(self.delay_s)
        if fault is Fault.DUPLICATE:
            self.sockets.get(address) or self.connect(address)
            self.sockets[address].send_multipart(frames, copy=False)
        if fault is Fault.CORRUPT and len(frames) > 1:
            frames = [*frames[:-1], flip_one_byte(frames[-1])]
        reply = super().request(address, frames, deadline_s, key)
        if fault is Fault.CORRUPT and len(frames) == 1 and len(reply) > 1:
            reply = [*reply[:-1], flip_one_byte(reply[-1])]
        return reply


def flip_one_byte(frame) -> bytes:
    data = bytearray(frame.buffer if hasattr(frame, "buffer") else frame)
    if data:
        data[len(data) // 2] ^= 0x10
    return bytes(data)

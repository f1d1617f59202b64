"""Transfer stats: one JSON line per save and per load, so a checker can tell KV that really
moved from a fallback (decode recomputing) and see how long each transfer took.

The worker half appends to `stats_path` (one file per instance); `read_transfers` folds every
file of a deployment into one `Transfer` per transfer key.
"""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec


class TransferRecord(msgspec.Struct, frozen=True):
    transfer_key: str
    side: str  # "save" (prefill extracted it) or "load" (decode injected it, or failed to)
    blocks: int
    bytes: int
    seconds: float
    error: str | None = None


class Transfer(msgspec.Struct):
    """What both sides recorded about one transfer key."""

    saved_blocks: int = 0
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    errors: list[str] = []


class TransferLog:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.lock = threading.Lock()
        self.encoder = msgspec.json.Encoder()

    def record(self, record: TransferRecord) -> None:
        if self.path is None:
            return
        line = self.encoder.encode(record) + b"\n"
        with self.lock, self.path.open("ab") as f:
            f.write(line)


def read_transfers(paths: list[Path]) -> dict[str, Transfer]:
    transfers: dict[str, Transfer] = {}
    decoder = msgspec.json.Decoder(TransferRecord)
    for path in paths:
        for line in path.read_bytes().splitlines() if path.exists() else []:
            record = decoder.decode(line)
            transfer = transfers.setdefault(record.transfer_key, Transfer())
            if record.error:
                transfer.errors.append(f"{record.side}: {record.error}")
            elif record.side == "save":
                transfer.saved_blocks += record.blocks
            else:
                transfer.loaded_blocks += record.blocks
                transfer.loaded_bytes += record.bytes
                transfer.load_seconds += record.seconds
    return transfers

"""Transfer stats: one JSON line per save and per load, so a checker can tell KV that really
moved from a fallback (decode recomputing) and see how long each transfer took.

The worker half appends to `stats_path` (one file per instance); `read_transfers` folds files
into one `Transfer` per transfer key, and `TransferLogs` does the same for a deployment's
folder as its logs grow.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import msgspec

from pdcheck.types import Transfer


log = logging.getLogger("pdcheck.connector")


class TransferRecord(msgspec.Struct, frozen=True):
    transfer_key: str
    side: str  # "save" (prefill extracted it) or "load" (decode injected it, or failed to)
    blocks: int
    bytes: int
    seconds: float
    error: str | None = None


class TransferLog:
    """Appends one line per record to `path`, if one is given. A write that fails (disk full,
    folder removed, no permission) is logged once as a warning and the log is given up: the
    engine whose connector writes it goes on serving."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.is_given_up = False
        self.lock = threading.Lock()
        self.encoder = msgspec.json.Encoder()

    def record(self, record: TransferRecord) -> None:
        if self.path is None or self.is_given_up:
            return
        line = self.encoder.encode(record) + b"\n"
        with self.lock:
            if self.is_given_up:
                return
            try:
                with self.path.open("ab") as f:
                    f.write(line)
            except OSError as e:
                self.is_given_up = True
                log.warning("transfer log %s cannot be written (%s); going on without it", self.path, e.strerror or e)


DECODER = msgspec.json.Decoder(TransferRecord)


def fold(transfers: dict[str, Transfer], lines: list[bytes]) -> None:
    """Add log lines to the per-key totals in `transfers`."""
    for line in lines:
        record = DECODER.decode(line)
        transfer = transfers.setdefault(record.transfer_key, Transfer())
        if record.error:
            transfer.errors.append(f"{record.side}: {record.error}")
        elif record.side == "save":
            transfer.saved_blocks += record.blocks
        else:
            transfer.loaded_blocks += record.blocks
            transfer.loaded_bytes += record.bytes
            transfer.load_seconds += record.seconds


def read_transfers(paths: list[Path]) -> dict[str, Transfer]:
    transfers: dict[str, Transfer] = {}
    for path in paths:
        fold(transfers, path.read_bytes().splitlines() if path.exists() else [])
    return transfers


class TransferLogs:
    """A deployment's transfer logs (`transfers-*.jsonl` in its folder), folded as they grow:
    each `update` reads only the whole lines appended since the last one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets: dict[Path, int] = {}
        self.transfers: dict[str, Transfer] = {}

    def update(self) -> dict[str, Transfer]:
        for path in sorted(self.folder.glob("transfers-*.jsonl")):
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            fold(self.transfers, complete.splitlines())
        return self.transfers

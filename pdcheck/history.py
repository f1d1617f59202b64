"""The history: one append-only JSON-lines log of what was asked, what came back, and when.

Each line is one operation: `invoke` when a request is sent, `ok` / `fail` / `info` when its
outcome is known (`info`: cut off, outcome unknown), plus `note` lines for calibration and
faults. Lines are flushed as they are written, so a crash leaves a readable prefix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec


class History:
    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("ab")
        self.encoder = msgspec.json.Encoder()
        self.start = time.monotonic()

    def record(self, kind: str, **fields: Any) -> None:
        line = {"time": round(time.monotonic() - self.start, 6), "kind": kind, **fields}
        self.file.write(self.encoder.encode(line) + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_history(path: Path) -> list[dict]:
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]

"""The reference connector's settings, read from vLLM's kv_connector_extra_config.

Keys: port (required), host, mode (get | put | put_async), plane (tcp | nccl), layout, deadline_s,
hold_s, share_s (how long decode keeps a pulled KV for the other children of an n>1 request),
buffer_bytes, spill_bytes, stats_path (a file for the transfer log; none by default). Bad
values raise ValueError naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from pdcheck.connector.layouts import KVLayout


class Mode(enum.Enum):
    PUT = "put"  # prefill pushes inline, at save time
    PUT_ASYNC = "put_async"  # prefill's send thread pushes a copy taken at save time
    GET = "get"  # decode pulls from prefill's outbox


class Plane(enum.Enum):
    TCP = "tcp"  # host memory: ZMQ control, bytes on plain TCP data connections
    NCCL = "nccl"  # GPU to GPU: the same ZMQ control, bytes over NCCL (CUDA KV caches only)


@dataclasses.dataclass(frozen=True)
class P2PConfig:
    port: int
    host: str = "127.0.0.1"
    mode: Mode = Mode.GET
    plane: Plane = Plane.TCP
    layout: KVLayout = KVLayout.BLOCKS_FIRST
    deadline_s: float = 10.0
    hold_s: float = 120.0
    share_s: float = 2.0
    buffer_bytes: int = 64 << 20
    spill_bytes: int = 64 << 20
    stats_path: str | None = None

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port!r}: expected 1-65535")
        if not isinstance(self.plane, Plane):
            raise ValueError(f"plane {self.plane!r}: expected one of {[p.value for p in Plane]}")
        for name in ("deadline_s", "hold_s", "share_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)!r}: must be positive")
        for name in ("buffer_bytes", "spill_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r}: must not be negative")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> P2PConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(extra) - set(fields)
        if unknown:
            raise ValueError(f"unknown reference connector settings: {sorted(unknown)}")
        if "port" not in extra:
            raise ValueError("reference connector: `port` is required")
        values = {}
        for key, raw in extra.items():
            values[key] = convert(key, raw)
        return cls(**values)


def convert(key: str, raw: Any):
    try:
        if key == "mode":
            return Mode(raw)
        if key == "plane":
            return Plane(raw)
        if key == "layout":
            return KVLayout(raw)
        if key in ("port", "buffer_bytes", "spill_bytes"):
            return int(raw)
        if key in ("deadline_s", "hold_s", "share_s"):
            return float(raw)
        return str(raw)
    except (ValueError, TypeError):  # TypeError: a JSON list or object where a number belongs
        raise ValueError(f"{key} {raw!r}: not a valid value") from None

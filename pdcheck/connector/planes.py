"""The worker half's data planes: one interface, a TCP plane and an NCCL plane behind it.

A plane moves one request's KV (a tensor [layers, blocks, *one_block], extracted at save time)
from prefill to decode, and answers its peers' announces on config.address:
- stage(key, data): called on the saving thread right after the extract; returns what offer
  and push take (the TCP plane: the tensor itself; the NCCL plane: its checksums and the event
  that orders the send after the extract).
- offer(key, request_id, staged) (GET): held for decode to pull, until hold_s passes.
- push(address, key, staged) (PUT, PUT_ASYNC): sent to decode at `address`; returns once it left.
- pull(address, key) (GET) and take(key) (PUT, PUT_ASYNC): the KV, by the deadline.
- finished(): requests whose offered KV left (or expired) since the last call.
- close(): stops every thread and socket the plane owns.
push, pull and take raise TimeoutError (no answer by the deadline) or ProtocolError (refused,
damaged, or the peer failed). push and pull share one client, so they are called from one thread
at a time: the saving thread (PUT), the send thread (PUT_ASYNC) or the loading thread (GET).
`client_factory(context)` makes that client: the seam where wire faults enter.
What both planes own besides their wire (settings, ZMQ context, Outbox, Inbox) is PlaneBase, in
pdcheck.connector.plane_base.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pdcheck.connector.config import P2PConfig, Plane
from pdcheck.connector.plane_base import PlaneBase
from pdcheck.connector.tcp import KVClient, KVServer, to_frame


class DataPlane(Protocol):
    def stage(self, key: str, data: torch.Tensor) -> Any: ...

    def offer(self, key: str, request_id: str, staged: Any) -> None: ...

    def push(self, address: str, key: str, staged: Any) -> None: ...

    def pull(self, address: str, key: str) -> torch.Tensor: ...

    def take(self, key: str) -> torch.Tensor: ...

    def finished(self) -> set[str]: ...

    def close(self) -> None: ...


def make_plane(config: P2PConfig, client_factory=None) -> DataPlane:
    if config.plane is Plane.NCCL:
        from pdcheck.connector.nccl_plane import NcclPlane  # CUDA and NCCL only where asked for

        return NcclPlane(config, client_factory)
    return TcpPlane(config, client_factory)


class TcpPlane(PlaneBase):
    """KV in host memory over pdcheck.connector.tcp: a KVServer, and one KVClient for transfers."""

    def __init__(self, config: P2PConfig, client_factory=None):
        super().__init__(config)
        self.attach(KVServer(self.context, config.address, self.outbox, self.inbox, config.deadline_s),
                    (client_factory or KVClient)(self.context))

    def stage(self, key: str, data: torch.Tensor) -> torch.Tensor:
        return data

    def offer(self, key: str, request_id: str, staged: torch.Tensor) -> None:
        self.outbox.put(key, request_id, to_frame(key, staged))

    def push(self, address: str, key: str, staged: torch.Tensor) -> None:
        self.client.push(address, key, staged, self.config.deadline_s)

    def pull(self, address: str, key: str) -> torch.Tensor:
        return self.client.pull(address, key, self.config.deadline_s)

    def take(self, key: str) -> torch.Tensor:
        data = self.inbox.take(key, self.config.deadline_s)
        if data is None:
            raise TimeoutError(f"{key} was not pushed within {self.config.deadline_s}s")
        return data

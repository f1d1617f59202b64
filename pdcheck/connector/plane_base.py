"""What every data plane owns besides its wire: PlaneBase, the base of TcpPlane and NcclPlane.

A plane built on PlaneBase holds its settings, one ZMQ context, the Outbox (KV offered to
peers) and the Inbox (KV received), then, once `attach` is called, its server (started there)
and its client. `close` stops the server, closes the client and ends the context, in that order,
so nothing the plane started outlives it. The DataPlane interface the worker half calls is in
pdcheck.connector.planes; this module sits below both planes so neither imports the other.
"""

from __future__ import annotations

import zmq

from pdcheck.connector.buffers import Inbox, Outbox
from pdcheck.connector.config import P2PConfig


class PlaneBase:
    """What every plane owns besides its wire: its settings, a ZMQ context, the Outbox and the
    Inbox, then (`attach`) its server and its client, all stopped by `close`."""

    def __init__(self, config: P2PConfig):
        self.config = config
        self.context = zmq.Context()
        self.outbox = Outbox(config.hold_s)
        self.inbox = Inbox(config.buffer_bytes, config.spill_bytes, config.hold_s)

    def attach(self, server, client) -> None:
        """Start the server; name the client and bound what it receives by the buffer."""
        self.server = server.start()
        self.client = client
        client.name, client.max_bytes = self.config.address, self.config.buffer_bytes + self.config.spill_bytes

    def finished(self) -> set[str]:
        return self.outbox.finished()

    def close(self) -> None:
        self.server.stop()
        self.client.close()
        self.context.term()

"""Clusters own processes: the engines of one configuration beside their oracle, started and
stopped together; they never send requests (that is the client's role, pdcheck.client).

Two clusters, one protocol:
- `deployment.Deployment`: xPyD engines in worker processes, driven in process (`LegsClient`);
- `http_cluster.ServedCluster`: `pdcheck serve` instances behind the PD proxy (`ProxyClient`).
"""

from __future__ import annotations

from typing import Protocol

from pdcheck.client import Client
from pdcheck.specs import EngineSpec
from pdcheck.types import EngineState, Transfer


class Instance(Protocol):
    name: str

    def drain(self, timeout_s: float = 10.0) -> EngineState | None:
        """What the instance holds once idle for up to `timeout_s`; None when it cannot be asked."""


class Cluster(Protocol):
    spec: EngineSpec
    oracle: Instance

    @property
    def topology(self) -> str:
        """`xPyD`."""

    @property
    def instances(self) -> list[Instance]:
        """The instances this cluster owns: each is drained after a configuration."""

    def client(self) -> Client:
        """The client that sends requests through this cluster's PD path."""

    def transfers(self) -> dict[str, Transfer]:
        """What the connector's transfer logs say moved, per transfer key (empty without logs)."""

    def revive(self) -> None:
        """Restart what died during the workload (killed for a hang or by a fault), where it can."""

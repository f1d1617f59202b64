"""An xPyD deployment beside its oracle: instances for one EngineSpec, started together.

`pair(i)` is the (prefill, decode) pair for the i-th batch of requests: prefills vary fastest,
so with 2P2D four batches cover P0>D0, P1>D0 (2P1D), P0>D1 (1P2D) and P1>D1.
Each instance's CPU core or GPUs come from the deployment's Layout (pdcheck/cluster/placement.py),
planned for the oracle, the prefills and the decodes together.
"""

from __future__ import annotations

from pathlib import Path

from pdcheck.client.legs import LegsClient
from pdcheck.cluster.instance import Instance
from pdcheck.cluster.placement import Layout
from pdcheck.config import EngineSpec, Role
from pdcheck.connector.stats import TransferLogs
from pdcheck.types import Transfer


class Deployment:
    def __init__(self, spec: EngineSpec, run_dir: Path, name: str, decode_spec: EngineSpec | None = None,
                 num_prefill: int = 1, num_decode: int = 1, oracle: Instance | None = None, layout: Layout = Layout()):
        """`oracle`: a running oracle to use (and leave running) instead of starting one; its
        place in `layout` is planned all the same."""
        assert spec.connector is not None, "a PD deployment needs a connector"
        self.spec = spec
        self.folder = run_dir / name  # also the connector's `{run_dir}`: nothing shared across deployments
        self.logs = TransferLogs(self.folder)
        oracle_place, *places = layout.place([Role.SINGLE] + [Role.PREFILL] * num_prefill + [Role.DECODE] * num_decode)
        self.owns_oracle = oracle is None
        self.oracle = oracle or Instance("oracle", spec.without_connector(), Role.SINGLE, self.folder, oracle_place)
        self.prefills = [Instance(f"prefill{i}", spec, Role.PREFILL, self.folder, places[i]) for i in range(num_prefill)]
        self.decodes = [Instance(f"decode{i}", decode_spec or spec, Role.DECODE, self.folder, places[num_prefill + i])
                        for i in range(num_decode)]

    @property
    def topology(self) -> str:
        return f"{len(self.prefills)}P{len(self.decodes)}D"

    @property
    def instances(self) -> list[Instance]:
        """The instances this deployment owns (starts and stops)."""
        return [self.oracle, *self.prefills, *self.decodes] if self.owns_oracle else [*self.prefills, *self.decodes]

    def transfers(self) -> dict[str, Transfer]:
        """What connectors that keep a transfer log (`transfers-*.jsonl` in `{run_dir}`) recorded."""
        return self.logs.update()

    def client(self) -> LegsClient:
        """The two legs in process, each batch to its pair (`pair(i)`)."""
        return LegsClient(self)

    def revive(self, instances: list[Instance] | tuple[Instance, ...] | None = None) -> None:
        """Restart each of `instances` (default: all) that died since it started: killed when it
        stopped answering, or by a fault. The requests after still get verdicts."""
        for instance in self.instances if instances is None else instances:
            if instance.start_s is not None and not instance.alive:
                instance.restart()

    def pair(self, i: int) -> tuple[Instance, Instance]:
        p = len(self.prefills)
        return self.prefills[i % p], self.decodes[(i // p) % len(self.decodes)]

    def start(self) -> Deployment:
        try:
            for instance in self.instances:
                instance.start()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self) -> Deployment:
        """Wait for every instance, connector instances first: a connector that cannot load
        fails before its engine is built, so bad input is reported without waiting for the rest."""
        try:
            for instance in [*self.prefills, *self.decodes, *self.instances]:
                if instance.start_s is None:
                    instance.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for instance in self.instances:
            instance.close()

    def __enter__(self) -> Deployment:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()

"""Deployments shared by a test session: started on first use, at most `max_alive` at a time.

Suites ask for a deployment by its specs; the pool starts it and closes the least recently
used one when over the limit. Oracles are shared: deployments whose engines have the same
settings (connector aside) use one oracle engine and its cached results, which lives while any
of them does. `close` stops everything; the pytest plugin calls it at the end of the session.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from pdcheck.checker.oracle import Oracle
from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.instance import Instance, stop_engine_server
from pdcheck.cluster.placement import cpu_plan
from pdcheck.config import EngineSpec, Role


class DeploymentPool:
    def __init__(self, run_dir: Path, max_alive: int = 2):
        self.run_dir, self.max_alive = run_dir, max_alive
        self.alive: OrderedDict[tuple, tuple[Deployment, Oracle]] = OrderedDict()
        self.oracles: dict[EngineSpec, Oracle] = {}
        self.starting: dict[tuple, tuple[Deployment, Oracle]] = {}  # prefetched, not yet waited for
        self.memo: dict[tuple, object] = {}
        self.count = 0

    @staticmethod
    def key(spec: EngineSpec, decode_spec: EngineSpec | None, num_prefill: int, num_decode: int) -> tuple:
        """A deployment's settings; decode's are given only where they differ from prefill's."""
        return spec, (None if decode_spec == spec else decode_spec), num_prefill, num_decode

    def get(self, spec: EngineSpec, decode_spec: EngineSpec | None = None, num_prefill: int = 1,
            num_decode: int = 1) -> tuple[Deployment, Oracle]:
        key = self.key(spec, decode_spec, num_prefill, num_decode)
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= self.max_alive:  # before taking a prefetched one: it keeps its oracle
            _, (old, _) = self.alive.popitem(last=False)
            old.close()
            self.close_unused_oracles()
        deployment, oracle = self.starting.pop(key, None) or self.launch(*key)
        try:
            if oracle.instance.start_s is None:
                oracle.instance.wait_ready()
            deployment.wait_ready()
        except BaseException:  # nothing half-started stays behind for the next test to trip on
            deployment.close()
            if not oracle.instance.alive:
                self.oracles.pop(spec.without_connector(), None)
            self.close_unused_oracles()
            raise
        self.alive[key] = (deployment, oracle)
        return self.alive[key]

    def prefetch(self, spec: EngineSpec, decode_spec: EngineSpec | None = None, num_prefill: int = 1,
                 num_decode: int = 1) -> None:
        """Start a deployment a coming test will ask for, so its start overlaps this test's work."""
        key = self.key(spec, decode_spec, num_prefill, num_decode)
        if key not in self.alive and key not in self.starting and not self.starting:
            self.starting[key] = self.launch(*key)

    def launch(self, spec, decode_spec, num_prefill, num_decode) -> tuple[Deployment, Oracle]:
        self.count += 1
        name = f"{self.count}-{spec.model.name}-{spec.dtype}"
        oracle = self.oracle_for(spec.without_connector())
        deployment = Deployment(spec, self.run_dir, name, decode_spec, num_prefill, num_decode, oracle=oracle.instance)
        return deployment.start(), oracle

    def oracle_for(self, spec: EngineSpec) -> Oracle:
        """The shared oracle for these settings, started (not yet waited for) if new."""
        if spec not in self.oracles:
            name = f"oracle-{len(self.oracles)}-{spec.model.name}-{spec.dtype}"
            instance = Instance(name, spec, Role.SINGLE, self.run_dir, cpu_plan(1)[0])
            self.oracles[spec] = Oracle(instance.start())
        return self.oracles[spec]

    def close_unused_oracles(self) -> None:
        used = {d.spec.without_connector() for d, _ in [*self.alive.values(), *self.starting.values()]}
        for spec in set(self.oracles) - used:
            self.oracles.pop(spec).instance.close()

    def once(self, key: tuple, compute):
        """compute() the first time `key` is asked for, the remembered value after that."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def release(self) -> None:
        """Stop every deployment and oracle now (the next `get` starts afresh): for a test that
        needs the machine's memory and cores for instances of its own."""
        for deployment, _ in [*self.alive.values(), *self.starting.values()]:
            deployment.close()
        self.alive.clear()
        self.starting.clear()
        self.close_unused_oracles()

    def close(self) -> None:
        self.release()
        stop_engine_server()

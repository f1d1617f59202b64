"""Deployments shared by a test session: started on first use, at most `max_alive` at a time.

Suites ask for a deployment by its specs; the pool starts it, keeps its Oracle (and so the
oracle's cached results) with it, and closes the least recently used one when over the limit.
`close` stops everything; the pytest plugin calls it at the end of the session.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from pdcheck.checker.oracle import Oracle
from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.instance import stop_engine_server
from pdcheck.config import EngineSpec


class DeploymentPool:
    def __init__(self, run_dir: Path, max_alive: int = 2):
        self.run_dir, self.max_alive = run_dir, max_alive
        self.alive: OrderedDict[tuple, tuple[Deployment, Oracle]] = OrderedDict()
        self.memo: dict[tuple, object] = {}
        self.count = 0

    def get(self, spec: EngineSpec, decode_spec: EngineSpec | None = None) -> tuple[Deployment, Oracle]:
        key = (spec, decode_spec)
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= self.max_alive:
            _, (old, _) = self.alive.popitem(last=False)
            old.close()
        self.count += 1
        name = f"{self.count}-{spec.model.name}-{spec.dtype}"
        deployment = Deployment(spec, self.run_dir, name, decode_spec=decode_spec)
        self.alive[key] = (deployment.start().wait_ready(), Oracle(deployment.oracle))
        return self.alive[key]

    def once(self, key: tuple, compute):
        """compute() the first time `key` is asked for, the remembered value after that."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def close(self) -> None:
        while self.alive:
            _, (deployment, _) = self.alive.popitem()
            deployment.close()
        stop_engine_server()

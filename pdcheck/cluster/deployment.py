"""A 1P1D deployment beside its oracle: three instances for one EngineSpec, started together.

CPUs are handed out round-robin over this process's allowed CPUs (oracle, prefill, decode),
so on two cores the oracle and decode share one and prefill has the other.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pdcheck.cluster.instance import Instance
from pdcheck.config import EngineSpec, Role


def cpu_plan(count: int) -> list[list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return [[cpus[i % len(cpus)]] for i in range(count)]


class Deployment:
    def __init__(self, spec: EngineSpec, run_dir: Path, name: str, decode_spec: EngineSpec | None = None):
        assert spec.connector is not None, "a PD deployment needs a connector"
        self.spec = spec
        self.folder = run_dir / name  # also the connector's `{run_dir}`: nothing shared across deployments
        oracle_cpus, prefill_cpus, decode_cpus = cpu_plan(3)
        self.oracle = Instance("oracle", spec.without_connector(), Role.SINGLE, self.folder, oracle_cpus)
        self.prefill = Instance("prefill", spec, Role.PREFILL, self.folder, prefill_cpus)
        self.decode = Instance("decode", decode_spec or spec, Role.DECODE, self.folder, decode_cpus)

    @property
    def instances(self) -> list[Instance]:
        return [self.oracle, self.prefill, self.decode]

    def start(self) -> Deployment:
        try:
            for instance in self.instances:
                instance.start()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self) -> Deployment:
        try:
            for instance in self.instances:
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


def with_decode_connector(spec: EngineSpec, connector) -> EngineSpec:
    return dataclasses.replace(spec, connector=connector)

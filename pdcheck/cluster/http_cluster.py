"""The real deployment shape, owned: `pdcheck serve` processes (vLLM's OpenAI server) behind the
PD proxy, on free loopback ports.

`ServedInstance` owns one server process: its own session (so its whole process group can be
signalled), killed if this process dies (PR_SET_PDEATHSIG), in its place (pinned to its CPU core,
or its GPUs as CUDA_VISIBLE_DEVICES; pdcheck/cluster/placement.py), with caches
under pdcheck's cache folder and TMPDIR in a short folder there (vLLM's server puts ZMQ IPC
sockets in TMPDIR, and a socket path may not pass 107 bytes), removed when it stops. `ServedCluster` owns a proxy, xPyD instances heartbeating to it and a
single-instance oracle; `close` stops them all, also after a failed start.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pdcheck.client.http import ProxyClient, complete_all, engine_state
from pdcheck.cluster.http_server import wait_healthy
from pdcheck.cluster.instance import cache_dir, free_port, instance_env, log_tail
from pdcheck.cluster.placement import Layout, Placement
from pdcheck.config import EngineSpec, Role
from pdcheck.connector.stats import TransferLogs
from pdcheck.errors import BadInput, InstanceFailed
from pdcheck.proxy.server import Proxy, ProxySettings
from pdcheck.types import EngineState, GenRequest, GenResult, Transfer

log = logging.getLogger("pdcheck.served")
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ServedInstance:
    def __init__(self, name: str, spec: EngineSpec, role: Role, run_dir: Path, placement: Placement):
        self.name, self.spec, self.role, self.run_dir, self.placement = name, spec, role, run_dir, placement
        self.proxy_heartbeat: str | None = None  # the proxy's address: its cluster sets it before a start
        self.port, self.kv_port = free_port(), free_port()
        self.env = placement.env() | instance_env(spec)
        self.folder = run_dir / "instances" / name
        self.process: subprocess.Popen | None = None
        self.tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ports(self) -> dict[str, int]:
        """The ports it listens on, by use."""
        return {"http": self.port} | ({"kv": self.kv_port} if self.role is not Role.SINGLE else {})

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def command(self) -> list[str]:
        spec = self.spec
        argv = [sys.executable, "-m", "pdcheck.cli", "serve", "--role", self.role.value, "--model", str(spec.model),
                "--dtype", spec.dtype, "--block-size", str(spec.block_size), "--max-model-len", str(spec.max_model_len),
                "--port", str(self.port), "--run-dir", str(self.run_dir)]
        if self.role is not Role.SINGLE:
            argv += ["--connector", spec.connector.name, "--connector-config", json.dumps(dict(spec.connector.extra_config)),
                     "--kv-port", str(self.kv_port), "--proxy", self.proxy_heartbeat, "--heartbeat-interval-s", "0.5"]
            if spec.connector.profile_file:
                argv += ["--profile", spec.connector.profile_file]
        return argv

    def start(self) -> ServedInstance:
        self.folder.mkdir(parents=True, exist_ok=True)
        (cache_dir() / "t").mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=cache_dir() / "t"))
        env = os.environ | {"TMPDIR": str(self.tmp), "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
                            "TORCHINDUCTOR_CACHE_DIR": str(cache_dir() / "inductor")} | self.env
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=die_with_parent)
        if self.placement.cpus:
            os.sched_setaffinity(self.process.pid, self.placement.cpus)
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                self.close()
                raise InstanceFailed(f"instance {self.name} exited with {self.process.returncode} while starting: "
                                     f"{log_tail(self.log_path)} (log: {self.log_path})")
            if wait_healthy(f"{self.url}/health", min(end, time.monotonic() + 1.0)):
                return
        self.close()
        raise InstanceFailed(f"instance {self.name} did not answer /health within {timeout_s}s: "
                             f"{log_tail(self.log_path)} (log: {self.log_path})")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def generate(self, requests: list[GenRequest], deadline_s: float) -> list[GenResult]:
        """The requests at once over HTTP (an oracle's interface, as pdcheck.cluster.instance has)."""
        return complete_all(self.url, self.spec.model.name, requests, timeout_s=deadline_s)

    def drain(self, timeout_s: float = 10.0) -> EngineState | None:
        """What the server holds once idle (read from its Prometheus metrics), or None if it is
        down. Polls until it holds nothing or the timeout passes."""
        end = time.monotonic() + timeout_s
        state = None
        while self.alive:
            state = engine_state(self.url)
            if state is None or state.idle or time.monotonic() > end:
                return state
            time.sleep(0.2)
        return None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.killpg(self.process.pid, sig)

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the server to stop (SIGTERM to its process group), kill the group if it does not.
        Idempotent, and never raises: whatever the server does, its whole group is killed."""
        if self.process is not None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with_group_gone(self.process.pid)
                try:
                    self.process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("instance %s (pid %d) still there %.0fs after SIGKILL", self.name, self.process.pid,
                                grace_s)
            with_group_gone(self.process.pid)  # the engine core and any other child the server started
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def with_group_gone(pgid: int) -> None:
    """Kill whatever is left of the process group (children the server started)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def served_places(layout: Layout, roles: list[Role]) -> list[Placement]:
    """`layout`'s places for `roles`; BadInput for a place `pdcheck serve` cannot take yet (it
    has no options for tensor parallelism or a share of GPU memory)."""
    places = layout.place(roles)
    for role, place in zip(roles, places):
        if place.tensor_parallel_size > 1 or place.gpu_memory_utilization is not None:
            who = "the oracle" if role is Role.SINGLE else f"a {role.value} instance"
            raise BadInput(f"--serve: {who} placed on {place.devices} needs tensor parallelism "
                           f"or a share of GPU memory, which pdcheck serve does not pass to vLLM yet; "
                           f"give each instance a GPU of its own (1+x+y GPUs for xPyD, tensor-parallel size 1)")
    return places


class ServedCluster:
    """xPyD `pdcheck serve` instances behind a proxy, beside a single-instance oracle, placed
    by `layout` (instances made here, started by `start`)."""

    def __init__(self, spec: EngineSpec, run_dir: Path, num_prefill: int = 1, num_decode: int = 1,
                 settings: ProxySettings = ProxySettings(expiry_s=3.0, heartbeat_interval_s=0.5), policy=None,
                 layout: Layout = Layout()):
        self.spec, self.folder, self.layout = spec, run_dir, layout
        self.logs = TransferLogs(run_dir)
        prefill_params = dict(spec.connector.prefill_params)
        self.proxy = Proxy(settings, policy, prefill_params)
        oracle_place, *places = served_places(layout, [Role.SINGLE] + [Role.PREFILL] * num_prefill
                                              + [Role.DECODE] * num_decode)
        self.oracle = ServedInstance("oracle", spec.without_connector(), Role.SINGLE, run_dir, oracle_place)
        self.num_prefill, self.num_decode = num_prefill, num_decode
        self.prefills = [ServedInstance(f"prefill{i}", spec, Role.PREFILL, run_dir, places[i]) for i in range(num_prefill)]
        self.decodes = [ServedInstance(f"decode{i}", spec, Role.DECODE, run_dir, places[num_prefill + i])
                        for i in range(num_decode)]

    @property
    def instances(self) -> list[ServedInstance]:
        return [self.oracle, *self.prefills, *self.decodes]

    def add(self, role: Role) -> ServedInstance:
        """Start one more instance of `role` in a started cluster, in the layout's next place; it
        joins by heartbeat once it is ready."""
        group = self.prefills if role is Role.PREFILL else self.decodes
        placement = served_places(self.layout, [i.role for i in self.instances] + [role])[-1]
        instance = ServedInstance(f"{role.value}{len(group)}", self.spec, role, self.folder, placement)
        group.append(instance)
        return self.launch(instance)

    def launch(self, instance: ServedInstance) -> ServedInstance:
        instance.proxy_heartbeat = self.proxy.heartbeat_address  # known once the proxy listens
        return instance.start()

    @property
    def topology(self) -> str:
        return f"{self.num_prefill}P{self.num_decode}D"

    def start(self) -> ServedCluster:
        try:
            self.proxy.start()
            for instance in self.instances:
                self.launch(instance)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServedCluster:
        try:
            for instance in self.instances:
                instance.wait_ready(timeout_s)
            self.wait_registered(timeout_s=10.0)
        except BaseException:
            self.close()
            raise
        return self

    def client(self, stream: bool = False) -> ProxyClient:
        """Requests through the proxy, which picks each pair and joins the legs."""
        return ProxyClient(self.proxy.url, self.spec.model.name, stream)

    def revive(self) -> None:
        """A served instance that died stays down: its drain reports it (not running)."""

    def wait_registered(self, timeout_s: float) -> None:
        """Until the proxy lists every live prefill and decode instance."""
        want = {(i.role.value, f"127.0.0.1:{i.port}") for i in [*self.prefills, *self.decodes] if i.alive}
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with urllib.request.urlopen(f"{self.proxy.url}/instances", timeout=2) as response:
                listed = json.loads(response.read())
            if want <= {(role, m["http_address"]) for role, members in listed.items() for m in members}:
                return
            time.sleep(0.1)
        raise InstanceFailed(f"the proxy did not list {sorted(want)} within {timeout_s}s")

    def transfers(self) -> dict[str, Transfer]:
        return self.logs.update()

    def close(self) -> None:
        """Stop every instance, then the proxy; a failure stopping one never leaves the rest running."""
        try:
            for instance in self.instances:
                instance.close()
        finally:
            self.proxy.stop()

    def __enter__(self) -> ServedCluster:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()

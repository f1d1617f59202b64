"""Reproducers: repro.json for every failing request of a run, replayed by `pdcheck repro`.

A repro holds what the run had: the engine and connector settings, the topology, and the
requests sent to that configuration in order, ending with the failing one (earlier requests
can leave state behind: stored KV, cached prefixes), plus the outcome seen. `replay` runs them
on a fresh deployment and oracle and judges the last one again; `shrink` drops earlier requests
by deterministic deletion passes (halves, then quarters, ... then single requests) while the
failure still shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import msgspec

from pdcheck.cluster.messages import GenRequest
from pdcheck.config import ConnectorSpec, DecodePrompt, EngineSpec, model_path
from pdcheck.errors import BadInput

VERSION = 1


class Repro(msgspec.Struct):
    engine: dict  # EngineSpec fields but the connector
    connector: dict  # ConnectorSpec fields
    topology: tuple[int, int]
    seed: int
    requests: list[GenRequest]  # in the order sent; the last one failed
    outcome: str  # what the last one did: diverged, error, hang, fallback
    detail: str = ""
    version: int = VERSION

    @property
    def spec(self) -> EngineSpec:
        connector = dict(self.connector)
        connector["extra_config"] = tuple(sorted(connector["extra_config"].items()))
        connector["prefill_params"] = tuple(sorted(connector["prefill_params"].items()))
        connector["decode_prompt"] = DecodePrompt(connector["decode_prompt"])
        engine = dict(self.engine, model=model_path(self.engine["model"]))
        return EngineSpec(**engine, connector=ConnectorSpec(**connector))


def make_repro(spec: EngineSpec, topology, seed: int, requests: list[GenRequest], outcome: str, detail: str) -> Repro:
    engine = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "connector"}
    engine["model"] = str(spec.model)
    c = spec.connector
    connector = {"name": c.name, "extra_config": dict(c.extra_config), "decode_prompt": c.decode_prompt.value,
                 "prefill_params": dict(c.prefill_params)}
    return Repro(engine, connector, tuple(topology), seed, requests, outcome, detail)


def write(repro: Repro, path: Path) -> Path:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(repro)))
    return path


def read(path: Path) -> Repro:
    try:
        repro = msgspec.json.decode(path.read_bytes(), type=Repro)
    except FileNotFoundError:
        raise BadInput(f"repro file {path}: no such file") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadInput(f"repro file {path}: not a pdcheck repro ({e})") from None
    if repro.version != VERSION:
        raise BadInput(f"repro file {path}: version {repro.version}, this pdcheck reads {VERSION}")
    if not repro.requests:
        raise BadInput(f"repro file {path}: no requests")
    return repro


def replay(repro: Repro, run_dir: Path, name: str, history):
    """The failing request's verdict on a fresh deployment (the earlier requests sent first)."""
    from pdcheck.cluster.deployment import Deployment
    from pdcheck.gate import check

    with Deployment(repro.spec, run_dir, name, None, *repro.topology) as deployment:
        return check(deployment, repro.requests, history)[1][-1]


def shrink(repro: Repro, fails: Callable[[list[GenRequest]], bool]) -> Repro:
    """Drop earlier requests while `fails(requests)` holds (ddmin over the prefix)."""
    *before, failing = repro.requests
    parts = 2
    while before:
        size = math.ceil(len(before) / parts)
        for start in range(0, len(before), size):
            candidate = before[:start] + before[start + size:]
            if fails([*candidate, failing]):
                before, parts = candidate, max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(before), parts * 2)
    return msgspec.structs.replace(repro, requests=[*before, failing])


def reproduced(checked, repro: Repro) -> bool:
    return not checked.passed and checked.counted == repro.outcome


def run_repro(args, stack, console) -> int:
    """`pdcheck repro FILE [--shrink]`: 0 if the failure shows again, 1 if it no longer does."""
    from itertools import count

    from pdcheck.store import RunStore

    repro = read(args.file)
    spec = repro.spec
    store = RunStore(args.runs_dir)
    stack.callback(store.close)
    console.print(f"replaying {len(repro.requests)} requests on {spec.label} with {spec.connector.name} "
                  f"({repro.topology[0]}P{repro.topology[1]}D); recorded: {repro.outcome}", markup=False)
    checked = replay(repro, store.folder, "replay", store.history)
    if not reproduced(checked, repro):
        console.print(f"did not reproduce: the request now ends as {checked.counted} (recorded: {repro.outcome})",
                      markup=False)
        return 1
    console.print(f"reproduced: {checked.counted} {checked.verdict.detail}", markup=False)
    if args.shrink:
        attempts = count()

        def fails(requests) -> bool:
            candidate = msgspec.structs.replace(repro, requests=requests)
            return reproduced(replay(candidate, store.folder, f"shrink-{next(attempts)}", store.history), repro)

        smaller = shrink(repro, fails)
        path = write(smaller, args.file.with_name(args.file.stem + ".min.json"))
        console.print(f"shrunk from {len(repro.requests)} to {len(smaller.requests)} requests in "
                      f"{next(attempts)} replays: pdcheck repro {path}", markup=False)
    return 0

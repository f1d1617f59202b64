"""Reproducers: repro.json for every failing request of a run, replayed by `pdcheck repro`.

A repro holds what the run had: the engine and connector settings, the topology, the
requests sent to that configuration in order, ending with the failing one (earlier requests
can leave state behind: stored KV, cached prefixes), the nemesis faults planned for them (each
on its request's index), and the outcome seen. `replay` runs them on a fresh deployment and
oracle, with the same faults, and judges the last one again after the drain; `shrink` drops
faults one at a time, then earlier requests by deterministic deletion passes (halves, then
quarters, ... then single requests; a fault goes with its request), while the failure still
shows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import msgspec

from pdcheck.config import FIXTURES, ConnectorSpec, DecodePrompt, EngineSpec, Role, model_path
from pdcheck.errors import BadInput
from pdcheck.profiles import Profile
from pdcheck.types import GenRequest, Planned

VERSION = 1


class Repro(msgspec.Struct):
    engine: dict  # EngineSpec fields but the connector
    connector: dict  # ConnectorSpec fields
    topology: tuple[int, int]
    seed: int
    requests: list[GenRequest]  # in the order sent; the last one failed
    outcome: str  # what the last one did: diverged, error, hang, fallback, leak
    detail: str = ""
    version: int = VERSION
    faults: list[Planned] = []  # batch: the index of the request it hits
    drain_s: float = 10.0  # how long the drain waited for instances to free what they hold

    @property
    def spec(self) -> EngineSpec:
        connector = dict(self.connector)
        connector["extra_config"] = tuple(sorted(connector["extra_config"].items()))
        connector["prefill_params"] = tuple(sorted(connector["prefill_params"].items()))
        connector["decode_prompt"] = DecodePrompt(connector["decode_prompt"])
        connector["profile"] = msgspec.convert(connector.get("profile", {}), Profile)
        connector["lineage"] = tuple(connector.get("lineage", ()))
        engine = dict(self.engine, model=model_path(self.engine["model"]))
        return EngineSpec(**engine, connector=ConnectorSpec(**connector))


def make_repro(spec: EngineSpec, topology, seed: int, requests: list[GenRequest], outcome: str, detail: str,
               faults: list[Planned] = (), drain_s: float = 10.0) -> Repro:
    engine = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "connector"}
    engine["model"] = str(spec.model)
    c = spec.connector
    connector = {"name": c.name, "extra_config": dict(c.extra_config), "decode_prompt": c.decode_prompt.value,
                 "prefill_params": dict(c.prefill_params), "profile": msgspec.to_builtins(c.profile),
                 "profile_file": c.profile_file, "lineage": list(c.lineage)}
    faults = [f for f in faults if f.batch < len(requests)]
    return Repro(engine, connector, tuple(topology), seed, requests, outcome, detail, faults=faults, drain_s=drain_s)


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
    """The failing request's verdict on a fresh deployment (the earlier requests sent first),
    after the drain (so a leak shows)."""
    from pdcheck.cluster.deployment import Deployment
    from pdcheck.gate import run_config

    with Deployment(repro.spec, run_dir, name, None, *repro.topology) as deployment:
        return run_config(deployment, repro.requests, history, faults=repro.faults, drain_s=repro.drain_s).requests[-1]


def shrink(repro: Repro, fails: Callable[[Repro], bool]) -> Repro:
    """Drop faults one at a time, then earlier requests (ddmin over the prefix), while
    `fails(candidate)` holds."""
    for fault in list(repro.faults):
        candidate = msgspec.structs.replace(repro, faults=[f for f in repro.faults if f != fault])
        if fails(candidate):
            repro = candidate
    before = list(range(len(repro.requests) - 1))  # indexes of the earlier requests kept
    parts = 2
    while before:
        size = math.ceil(len(before) / parts)
        for start in range(0, len(before), size):
            candidate = before[:start] + before[start + size:]
            if fails(keep(repro, candidate)):
                before, parts = candidate, max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(before), parts * 2)
    return keep(repro, before)


def keep(repro: Repro, earlier: list[int]) -> Repro:
    """The repro with only these earlier requests and the failing one; faults move with their
    requests, and go with them."""
    kept = [*earlier, len(repro.requests) - 1]
    index = {old: new for new, old in enumerate(kept)}
    faults = [msgspec.structs.replace(f, batch=index[f.batch]) for f in repro.faults if f.batch in index]
    return msgspec.structs.replace(repro, requests=[repro.requests[i] for i in kept], faults=faults)


def reproduced(checked, repro: Repro) -> bool:
    """The last request failed as recorded (a known defect counts: the file says what it saw)."""
    return repro.outcome != "match" and checked.outcome == repro.outcome


def run_repro(args, stack, console) -> int:
    """`pdcheck repro FILE [--shrink] [--export SCRIPT]`: 0 if the failure shows again, 1 if it
    no longer does."""
    from itertools import count

    from pdcheck.store import RunStore

    repro = read(args.file)
    spec = repro.spec
    if args.export:
        export(repro, args.export)  # refuses what it cannot export before anything runs
    store = RunStore(args.runs_dir)
    stack.callback(store.close)
    console.print(f"replaying {len(repro.requests)} requests on {spec.label} with {spec.connector.name} "
                  f"({repro.topology[0]}P{repro.topology[1]}D); recorded: {repro.outcome}", markup=False)
    checked = replay(repro, store.folder, "replay", store.history)
    if not reproduced(checked, repro):
        console.print(f"did not reproduce: the request now ends as {checked.outcome} "
                      f"(recorded: {repro.outcome})",
                      markup=False)
        return 1
    console.print(f"reproduced: {checked.outcome} {checked.leak or checked.verdict.detail}", markup=False)
    if args.export:
        console.print(f"standalone script: python {args.export}", markup=False)
    if args.shrink:
        attempts = count()

        def fails(candidate: Repro) -> bool:
            return reproduced(replay(candidate, store.folder, f"shrink-{next(attempts)}", store.history), repro)

        smaller = shrink(repro, fails)
        path = write(smaller, args.file.with_name(args.file.stem + ".min.json"))
        console.print(f"shrunk from {len(repro.requests)} to {len(smaller.requests)} requests and from "
                      f"{len(repro.faults)} to {len(smaller.faults)} faults in {next(attempts)} replays: "
                      f"pdcheck repro {path}", markup=False)
    return 0


def export(repro: Repro, path: Path) -> Path:
    """A standalone script (vLLM and torch only) that fails the way the repro does."""
    from pdcheck.repro import script as repro_script

    spec, connector = repro.spec, repro.spec.connector
    module = connector.module_path or ""
    if module.split(".")[0] == "pdcheck" or connector.module_dir:
        raise BadInput(f"--export: connector {connector.name} is not importable without pdcheck; "
                       f"an exported script can name vLLM's connectors or an installed module")
    config, seed, recipe = model_recipe(spec.model)
    params = {
        "config": config, "seed": seed, "recorded": f"{repro.outcome}: {repro.detail}",
        "engine": {"dtype": spec.dtype, "block_size": spec.block_size, "max_model_len": spec.max_model_len,
                   "prefix_caching": spec.prefix_caching, "num_blocks": spec.num_blocks},
        "kv_transfer_config": {role.value: connector.kv_transfer_config("{run_dir}", "{port}", role)
                               for role in (Role.PREFILL, Role.DECODE)},
        "instance_env": dict(connector.profile.instance_env),
        "prefill_params": dict(connector.prefill_params), "decode_prompt": connector.decode_prompt.value,
        "requests": [[r.prompt, r.max_tokens] for r in repro.requests],
    }
    text = "\n\n".join([
        "#!/usr/bin/env python3\n" + inspect.getsource(repro_script).rstrip(),
        "# -- the tiny model's weights, from its config and seed --\nimport math\n\n" + recipe,
        f"PARAMS = json.loads({json.dumps(json.dumps(params))})",
        'if __name__ == "__main__":\n    sys.exit(main(PARAMS, make_weights))\n',
    ])
    path.write_text(text)
    return path


def model_recipe(model: Path) -> tuple[dict, int, str]:
    """An embedded model's config, seed and the source of its weight recipe."""
    spec = importlib.util.spec_from_file_location("pdcheck_make_models", FIXTURES.parent / "make_models.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    names = sorted(maker.MODELS)
    if model.parent != FIXTURES or model.name not in names:
        raise BadInput(f"--export: {model} is not an embedded model; an exported script makes its model inline, "
                       f"so it can only carry tiny-llama or tiny-qwen3-moe")
    functions = [maker.parameter_shapes, maker.mlp_shapes, maker.moe_shapes, maker.make_weights]
    return maker.MODELS[model.name], maker.SEED + names.index(model.name), "\n\n".join(map(inspect.getsource, functions))

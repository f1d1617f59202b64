"""Replay lines: the one command that re-runs a failing request of a configuration.

Requests of a workload go through the deployment in order and can leave state behind (stored
KV, cached prefixes), so the replay sends the failing request after the ones that came before.
"""

from __future__ import annotations

import json
import shlex

from pdcheck.config import EngineSpec


def connector_options(connector) -> list[str]:
    """The options that give `connector` its settings where they differ from its profile's."""
    parts = ["--profile", connector.profile_file] if connector.profile_file else []
    extra = dict(connector.extra_config)
    if extra != connector.profile.extra_config:
        parts += ["--connector-config", json.dumps(extra, sort_keys=True)]
    if connector.decode_prompt is not connector.profile.decode_prompt:
        parts += ["--decode-prompt", connector.decode_prompt.value]
    return parts


def replay_command(spec: EngineSpec, seed: int, max_tokens: int, lengths: list[int], nemesis: int | None = None,
                   drain_s: float = 10.0, topology: tuple[int, int] = (1, 1),
                   workload: tuple[str, ...] = ("boundary",)) -> str:
    """`lengths`: the prompt lengths sent, in order, ending with the failing request's. A
    nemesis plan for fewer requests is the start of the plan for more, so the seed replays it."""
    connector = spec.connector
    parts = ["pdcheck", "run", "--model", str(spec.model), "--dtype", spec.dtype,
             "--block-size", str(spec.block_size), "--max-model-len", str(spec.max_model_len),
             "--connector", connector.name, "--seed", str(seed), "--max-tokens", str(max_tokens),
             "--lengths", ",".join(map(str, lengths))]
    parts += connector_options(connector)
    if tuple(topology) != (1, 1):
        parts += ["--topology", "{}P{}D".format(*topology)]
    if nemesis is not None:
        parts += ["--nemesis", str(nemesis)]
    if drain_s != 10.0:
        parts += ["--drain-s", f"{drain_s:g}"]
    if tuple(workload) != ("boundary",):
        parts += ["--workload", ",".join(workload)]
    return shlex.join(parts)

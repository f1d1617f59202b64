"""Configuration from user input: connector and model names, JSON settings and enum values,
each turned into a spec or refused with BadInput that names the value.

An EngineSpec says what one vLLM engine runs (model, dtype, block size, connector); a
ConnectorSpec names the connector under test and how the two legs of a request are joined.
Both are defined in pdcheck.specs (the layer the cluster modules import) and importable from
here. `connector_spec` is the one way from a name to a complete ConnectorSpec: it resolves the
name's class (pdcheck.cluster.resolve), picks its profile and lays the user's settings over it.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

from pdcheck.cluster import resolve
from pdcheck.errors import BadInput
from pdcheck.profiles import DecodePrompt, load_override, profile_for
from pdcheck.specs import DTYPES, REFERENCE, ConnectorSpec, EngineSpec, Role, fill

__all__ = ["ALIASES", "DTYPES", "FIXTURES", "REFERENCE", "ConnectorSpec", "DecodePrompt", "EngineSpec", "Role",
           "connector_lineage", "connector_spec", "fill", "model_path", "parse_enum", "parse_json_object"]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "models"
ALIASES = {"reference": REFERENCE}


def connector_spec(name: str, config_json: str | None = None, decode_prompt: str | None = None,
                   profile_file: str | None = None) -> ConnectorSpec:
    """Build a ConnectorSpec from CLI or pytest option strings: the profile of the connector's
    resolved class (pdcheck/profiles.py), overridden by `profile_file` if given, then the
    user's settings and decode prompt over the profile's."""
    name = ALIASES.get(name, name)
    spec = ConnectorSpec(name=name)  # checks the name's form before anything is imported
    lineage = tuple(connector_lineage(spec))
    profile = profile_for(lineage)
    if profile_file is not None:
        profile = load_override(profile, profile_file)
        profile_file = str(Path(profile_file).resolve())
    extra = dict(profile.extra_config) | parse_json_object(config_json, "connector config")
    prompt = profile.decode_prompt if decode_prompt is None else parse_enum(DecodePrompt, decode_prompt, "decode prompt")
    return ConnectorSpec(name=name, extra_config=tuple(sorted(extra.items())), decode_prompt=prompt,
                         prefill_params=tuple(sorted(profile.prefill_params.items())), profile=profile,
                         profile_file=profile_file, lineage=lineage)


def connector_lineage(spec: ConnectorSpec) -> list[str]:
    """The connector class's MRO as qualified names; empty where it cannot be resolved here (no
    vLLM, or a module that does not import: the instance's start then says so, as bad input)."""
    return resolve.lineage(spec)


def parse_json_object(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{what}: invalid JSON ({e.msg} at position {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_enum(kind: type[enum.Enum], value: str, what: str):
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise BadInput(f"{what} {value!r}: expected one of {allowed}") from None


def model_path(name: str) -> Path:
    """A model folder, or the name of an embedded model (tiny-llama, tiny-qwen3-moe)."""
    path = Path(name)
    if not path.exists() and (FIXTURES / name).exists():
        path = FIXTURES / name
    if not (path / "config.json").is_file():
        raise BadInput(f"model {name!r}: no such model folder (expected {path / 'config.json'})")
    return path.resolve()

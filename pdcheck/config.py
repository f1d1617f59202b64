"""Configuration: frozen dataclasses and enums, validated on construction with BadInput.

An EngineSpec says what one vLLM engine runs (model, dtype, block size, connector); a
ConnectorSpec names the connector under test and how the two legs of a request are joined.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from pathlib import Path
from typing import Any

from pdcheck.errors import BadInput

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "models"
DTYPES = ("float32", "bfloat16")


class Role(enum.Enum):
    SINGLE = "single"
    PREFILL = "prefill"
    DECODE = "decode"


class DecodePrompt(enum.Enum):
    """What the decode leg is given: the original prompt, or the prompt plus prefill's token."""

    ORIGINAL = "original"
    WITH_FIRST_TOKEN = "with_first_token"


@dataclasses.dataclass(frozen=True)
class ConnectorSpec:
    """A connector under test: a vLLM built-in name, `module:Class` or `path/to/file.py:Class`.

    String values in `extra_config` may hold `{run_dir}`, filled in with the run folder.
    """

    name: str
    extra_config: tuple[tuple[str, Any], ...] = ()
    decode_prompt: DecodePrompt = DecodePrompt.ORIGINAL
    prefill_params: tuple[tuple[str, Any], ...] = (("do_remote_decode", True),)

    def __post_init__(self):
        if not re.fullmatch(r"[\w./-]+(:\w+)?", self.name):
            raise BadInput(f"connector {self.name!r}: expected a name, module:Class or file.py:Class")
        module, _, _ = self.name.partition(":")
        if module.endswith(".py") and not Path(module).is_file():
            raise BadInput(f"connector {self.name!r}: file {module} does not exist")

    def __hash__(self) -> int:  # extra_config may hold JSON lists and objects
        return hash(json.dumps([self.name, self.extra_config, self.decode_prompt.value], sort_keys=True, default=str))

    @property
    def class_name(self) -> str:
        return self.name.rpartition(":")[2]

    @property
    def module_path(self) -> str | None:
        """The module vLLM imports the class from, or None for a built-in connector."""
        if ":" not in self.name:
            return None
        module = self.name.partition(":")[0]
        return Path(module).stem if module.endswith(".py") else module

    @property
    def module_dir(self) -> str | None:
        """The folder to put on sys.path for a `file.py:Class` connector."""
        module = self.name.partition(":")[0]
        return str(Path(module).resolve().parent) if module.endswith(".py") else None

    def kv_transfer_config(self, run_dir: Path, port: int) -> dict[str, Any]:
        """vLLM's kv_transfer_config, with `{run_dir}` and this instance's `{port}` filled in.

        `kv_load_failure_policy` ("fail" or "recompute"), if given among the connector's
        settings, is vLLM's own setting for loads that fail, and is passed to vLLM as such.
        """
        extra = {k: v.format(run_dir=run_dir, port=port) if isinstance(v, str) else v for k, v in self.extra_config}
        policy = extra.pop("kv_load_failure_policy", None)
        config = {"kv_connector": self.class_name, "kv_role": "kv_both", "kv_connector_extra_config": extra}
        if policy is not None:
            config["kv_load_failure_policy"] = policy
        if self.module_path:
            config["kv_connector_module_path"] = self.module_path
        return config


REFERENCE = "pdcheck.connector.plugin:P2PConnector"
ALIASES = {"reference": REFERENCE}

BUILTIN_DEFAULTS = {
    # ExampleConnector keys stored KV by a hash of the prompt, saved under a shared folder.
    "ExampleConnector": {
        "extra_config": {"shared_storage_path": "{run_dir}/kv"},
        "decode_prompt": DecodePrompt.WITH_FIRST_TOKEN,
    },
    # pdcheck's reference connector: each instance listens on its own port; PUT modes push
    # to the decode instance named in the prefill leg's parameters.
    "P2PConnector": {
        "extra_config": {"port": "{port}", "stats_path": "{run_dir}/transfers-{port}.jsonl"},
        "prefill_params": {"do_remote_decode": True, "remote_decode": "{decode_addr}"},
    },
}


def connector_spec(name: str, config_json: str | None = None, decode_prompt: str | None = None) -> ConnectorSpec:
    """Build a ConnectorSpec from CLI or pytest option strings, filling built-in defaults."""
    name = ALIASES.get(name, name)
    defaults = BUILTIN_DEFAULTS.get(name.rpartition(":")[2], {})
    extra = dict(defaults.get("extra_config", {}))
    extra.update(parse_json_object(config_json, "connector config"))
    prompt = defaults.get("decode_prompt", DecodePrompt.ORIGINAL)
    if decode_prompt is not None:
        prompt = parse_enum(DecodePrompt, decode_prompt, "decode prompt")
    prefill = defaults.get("prefill_params", {"do_remote_decode": True})
    return ConnectorSpec(name=name, extra_config=tuple(sorted(extra.items())), decode_prompt=prompt,
                         prefill_params=tuple(sorted(prefill.items())))


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


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One engine's settings. The oracle has the same spec with no connector."""

    model: Path
    dtype: str = "float32"
    block_size: int = 32
    max_model_len: int = 256
    connector: ConnectorSpec | None = None
    prefix_caching: bool = False
    # KV blocks per engine: 1024 x 32 tokens holds 64 requests of 256 tokens in about 0.5 GB
    # (vLLM's CPU default sizes the pool by VLLM_CPU_KVCACHE_SPACE: 1 GiB, 1.6 GB resident);
    # a small pool forces preemption and quick block reuse
    num_blocks: int | None = 1024

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise BadInput(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.block_size <= 0 or self.block_size % 32:
            raise BadInput(f"block_size {self.block_size}: must be a positive multiple of 32 on CPU")
        if self.max_model_len < self.block_size:
            raise BadInput(f"max_model_len {self.max_model_len}: must be at least block_size")
        if self.num_blocks is not None and (self.num_blocks - 1) * self.block_size < self.max_model_len:
            # vLLM keeps one block back (the null block)
            raise BadInput(f"num_blocks {self.num_blocks}: too few to hold one request of max_model_len tokens "
                           f"(vLLM keeps one block back)")

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.dtype}"

    def without_connector(self) -> EngineSpec:
        return dataclasses.replace(self, connector=None)

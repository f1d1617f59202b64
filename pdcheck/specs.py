"""What an engine runs: Role, ConnectorSpec and EngineSpec, frozen and validated on construction.

The bottom of the configuration: plain data that the cluster modules (pdcheck.cluster) build
engines from. It imports nothing that starts a process or imports vLLM, and nothing that
resolves a connector name to its class: pdcheck.config builds a ConnectorSpec from user input
(profile and lineage included) and re-exports these names. A spec that is constructed is valid:
a bad value raises BadInput naming the field and the value, never later.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from pathlib import Path
from typing import Any

from pdcheck.errors import BadInput
from pdcheck.profiles import DecodePrompt, Profile

DTYPES = ("float32", "bfloat16")
REFERENCE = "pdcheck.connector.plugin:P2PConnector"


class Role(enum.Enum):
    SINGLE = "single"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class ConnectorSpec:
    """A connector under test: a vLLM built-in name, `module:Class` or `path/to/file.py:Class`.

    String values in `extra_config` may hold `{run_dir}`, filled in with the run folder.
    `profile` is what the harness must know to drive it (pdcheck/profiles.py); `profile_file`
    the file it was overridden from, if any (replay lines carry it); `lineage` the MRO of the
    class the name resolved to (known defects are matched against it).
    """

    name: str
    extra_config: tuple[tuple[str, Any], ...] = ()
    decode_prompt: DecodePrompt = DecodePrompt.ORIGINAL
    prefill_params: tuple[tuple[str, Any], ...] = (("do_remote_decode", True),)
    profile: Profile = Profile()
    profile_file: str | None = None
    lineage: tuple[str, ...] = ()  # the resolved class's MRO, qualified names, nearest first

    def __post_init__(self):
        if not re.fullmatch(r"[\w./-]+(:\w+)?", self.name):
            raise BadInput(f"connector {self.name!r}: expected a name, module:Class or file.py:Class")
        module, _, _ = self.name.partition(":")
        if module.endswith(".py") and not Path(module).is_file():
            raise BadInput(f"connector {self.name!r}: file {module} does not exist")

    def __hash__(self) -> int:  # extra_config may hold JSON lists and objects
        return hash(json.dumps([self.name, self.extra_config, self.decode_prompt.value, self.profile_file],
                               sort_keys=True, default=str))

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

    def kv_transfer_config(self, run_dir: Path, port: int, role: Role | None = None) -> dict[str, Any]:
        """vLLM's kv_transfer_config, with `{run_dir}` and this instance's `{port}` filled in,
        and the profile's top-level fields (kv_buffer_device, the kv_role of `role`'s side).

        `kv_load_failure_policy` ("fail" or "recompute"), if given among the connector's
        settings, is vLLM's own setting for loads that fail, and is passed to vLLM as such.
        """
        extra = {k: fill(v, run_dir, port) for k, v in self.extra_config}
        policy = extra.pop("kv_load_failure_policy", None)
        kv_role = {Role.PREFILL: self.profile.kv_role_prefill, Role.DECODE: self.profile.kv_role_decode}.get(role, "kv_both")
        config = {"kv_connector": self.class_name, "kv_role": kv_role, "kv_connector_extra_config": extra}
        if policy is not None:
            config["kv_load_failure_policy"] = policy
        if self.profile.kv_buffer_device is not None:
            config["kv_buffer_device"] = self.profile.kv_buffer_device
        if self.module_path:
            config["kv_connector_module_path"] = self.module_path
        return config


def fill(value: Any, run_dir: Path, port: int) -> Any:
    """A setting with `{run_dir}` and `{port}` filled in its strings, inside lists and objects too
    (MultiConnector's child connectors carry settings of their own)."""
    if isinstance(value, str):
        return value.format(run_dir=run_dir, port=port)
    if isinstance(value, dict):
        return {k: fill(v, run_dir, port) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, run_dir, port) for v in value]
    return value


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
    # tokens per engine step; below max_model_len, long prompts are prefilled in chunks
    max_num_batched_tokens: int | None = None

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

"""Connector profiles: everything the harness must know to drive a connector, in one typed place.

A profile says how the two legs of a request are joined (what decode is given, what the prefill
leg carries), what vLLM's kv_transfer_config needs beside the connector's own settings
(kv_buffer_device, kv_role per side), what each instance needs of its own (environment
variables, e.g. a side-channel port: `{free_port}` in a value is a fresh loopback port per
instance), how long a drain must wait past for the connector's own hold or lease, how many
prompt tokens decode is expected to load, what the connector promises when prefill is lost, and
which failure classes do not apply to it (each with the reason, shown as a skip).

Built-in profiles are keyed by qualified class name. A connector gets the profile of its class,
or of its nearest base class that has one (a subclass of ExampleConnector is driven as
ExampleConnector is), never by the string a user typed. A profile file (JSON or TOML) overrides
any of the fields; an unknown field or a bad value is BadInput naming it.
"""

from __future__ import annotations

import enum
import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from pdcheck.errors import BadInput


class DecodePrompt(enum.Enum):
    """What the decode leg is given: the original prompt, or the prompt plus prefill's token."""

    ORIGINAL = "original"
    WITH_FIRST_TOKEN = "with_first_token"


class ExpectedLoad(enum.Enum):
    """How many of a prompt's L tokens decode is expected to load through the connector."""

    ALL_BUT_LAST = "L-1"  # decode computes the last prompt token itself
    ALL = "L"
    WHOLE_BLOCKS = "align(L)"  # only the whole blocks of the prompt (L rounded down)
    WHOLE_BLOCKS_BUT_LAST = "align(L-1)"  # whole blocks, never the last prompt token

    def tokens(self, prompt_len: int, block_size: int) -> int:
        if self is ExpectedLoad.ALL_BUT_LAST:
            return prompt_len - 1
        if self is ExpectedLoad.ALL:
            return prompt_len
        if self is ExpectedLoad.WHOLE_BLOCKS:
            return prompt_len // block_size * block_size
        return (prompt_len - 1) // block_size * block_size


class OnPrefillLoss(enum.Enum):
    """What a connector promises when prefill dies or goes silent before decode has its KV."""

    ERROR = "error"  # the request ends as a clean error by the connector's deadline
    RECOMPUTE = "recompute"  # decode recomputes the prompt and returns the oracle's tokens


class FailureClass(enum.Enum):
    """The battery's failure classes (pdcheck/conformance/), as a profile names them in `skips`."""

    EQUIVALENCE = "equivalence"
    REPEATED = "repeated"
    CONCURRENT = "concurrent"
    PREFIX_HITS = "prefix_hits"
    PREEMPTION = "preemption"
    ABORTS = "aborts"
    PROCESS_FAULTS = "process_faults"
    TOPOLOGY = "topology"
    MOE = "moe"
    LONG_PROMPTS = "long_prompts"
    SERVED = "served"
    HANDLES = "handles"
    RECOVERY = "recovery"
    ASYMMETRY = "asymmetry"


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One connector's requirements. `connector` names the class the profile was made for."""

    connector: str = "generic"
    decode_prompt: DecodePrompt = DecodePrompt.ORIGINAL
    prefill_params: dict[str, Any] = msgspec.field(default_factory=lambda: {"do_remote_decode": True})
    extra_config: dict[str, Any] = {}
    kv_buffer_device: str | None = None
    kv_role_prefill: str = "kv_both"
    kv_role_decode: str = "kv_both"
    instance_env: dict[str, str] = {}
    lease_s: float = 0.0
    expected_load: ExpectedLoad = ExpectedLoad.ALL_BUT_LAST
    on_prefill_loss: OnPrefillLoss = OnPrefillLoss.ERROR
    skips: dict[FailureClass, str] = {}

    def __post_init__(self):
        if self.lease_s < 0:
            raise BadInput(f"profile {self.connector}: lease_s {self.lease_s!r} must not be negative")
        for role in (self.kv_role_prefill, self.kv_role_decode):
            if role not in ("kv_both", "kv_producer", "kv_consumer"):
                raise BadInput(f"profile {self.connector}: kv_role {role!r}: expected kv_both, kv_producer or kv_consumer")

    def skip_reason(self, failure_class: FailureClass) -> str | None:
        return self.skips.get(failure_class)

    def expected_tokens(self, prompt_len: int, block_size: int) -> int:
        return self.expected_load.tokens(prompt_len, block_size)


REFERENCE_CLASS = "pdcheck.connector.plugin.P2PConnector"
EXAMPLE_CLASS = "vllm.distributed.kv_transfer.kv_connector.v1.example_connector.ExampleConnector"
NIXL_CLASS = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector.NixlBaseConnector"  # NixlConnector is its pull variant
MOONCAKE_CLASS = "vllm.distributed.kv_transfer.kv_connector.v1.mooncake.mooncake_connector.MooncakeConnector"
MULTI_CLASS = "vllm.distributed.kv_transfer.kv_connector.v1.multi_connector.MultiConnector"

BUILTIN: dict[str, Profile] = {
    # pdcheck's reference: each instance listens on its own port; put modes push to the decode
    # instance named in the prefill leg's parameters. Unpulled KV is kept for hold_s.
    REFERENCE_CLASS: Profile(
        connector=REFERENCE_CLASS,
        prefill_params={"do_remote_decode": True, "remote_decode": "{decode_addr}"},
        extra_config={"port": "{port}", "stats_path": "{run_dir}/transfers-{port}.jsonl", "hold_s": 10},
        lease_s=10.0,
    ),
    # vLLM's shared-storage example: KV saved to files keyed by a hash of the prompt; decode is
    # given the prompt plus prefill's token (its offline convention) and loads whole blocks.
    EXAMPLE_CLASS: Profile(
        connector=EXAMPLE_CLASS,
        decode_prompt=DecodePrompt.WITH_FIRST_TOKEN,
        extra_config={"shared_storage_path": "{run_dir}/kv"},
        expected_load=ExpectedLoad.WHOLE_BLOCKS,
        on_prefill_loss=OnPrefillLoss.RECOMPUTE,
        skips={
            FailureClass.SERVED: "decode is given the prompt plus prefill's first token; an OpenAI proxy "
                                 "gives it the original prompt",
            FailureClass.PROCESS_FAULTS: "no peer: prefill's KV is on disk before decode starts, so a paused or "
                                         "killed prefill cannot be met mid-transfer",
        },
    ),
    # vLLM's NIXL connector on CPU: KV in host memory (kv_buffer_device cpu, at the top level of
    # kv_transfer_config), a side-channel port per instance (VLLM_NIXL_SIDE_CHANNEL_PORT, read
    # when the engine is built), unclaimed KV freed after kv_lease_duration (30 s by default).
    # Decode loads the whole prompt (L tokens) and recomputes the last one itself.
    NIXL_CLASS: Profile(
        connector=NIXL_CLASS,
        kv_buffer_device="cpu",
        # one UCX worker thread, not vLLM's default 4: each polls without sleeping, and four per
        # engine starve the engines themselves on a machine of a few cores
        extra_config={"num_threads": 1},
        kv_role_prefill="kv_producer",  # kv_both is deprecated for it
        kv_role_decode="kv_consumer",
        instance_env={"VLLM_NIXL_SIDE_CHANNEL_PORT": "{free_port}"},
        lease_s=30.0,
        expected_load=ExpectedLoad.ALL,
    ),
    # vLLM's Mooncake connector over its transfer engine's TCP transport (the default is rdma):
    # prefill pushes to decode once decode asks; a bootstrap server per prefill instance
    # (VLLM_MOONCAKE_BOOTSTRAP_PORT) tells decode where prefill's worker listens. Unclaimed KV is
    # freed after VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT (480 s by default; 20 s here). It returns no
    # kv_transfer_params from prefill: pdcheck.adapters.mooncake does its proxy's part.
    MOONCAKE_CLASS: Profile(
        connector=MOONCAKE_CLASS,
        extra_config={"mooncake_protocol": "tcp", "num_workers": 2},
        kv_role_prefill="kv_producer",
        kv_role_decode="kv_consumer",
        instance_env={"VLLM_MOONCAKE_BOOTSTRAP_PORT": "{free_port}", "VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT": "20"},
        lease_s=20.0,
        expected_load=ExpectedLoad.ALL,
    ),
    # vLLM's MultiConnector: loads through the first child that has the prompt, saves through all.
    # By default NIXL for PD (as NIXL's profile drives it) and an ExampleConnector store of each
    # instance's own ({port} differs per instance), the composition vLLM's docs show; no
    # offloading connector runs on CPU. Prefill's store serves its repeated prompts.
    MULTI_CLASS: Profile(
        connector=MULTI_CLASS,
        kv_buffer_device="cpu",
        extra_config={"connectors": [
            {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
             "kv_connector_extra_config": {"num_threads": 1}},
            {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"shared_storage_path": "{run_dir}/store-{port}"}},
        ]},
        instance_env={"VLLM_NIXL_SIDE_CHANNEL_PORT": "{free_port}"},
        lease_s=30.0,
        expected_load=ExpectedLoad.ALL,
    ),
}


def profile_for(lineage: list[str]) -> Profile:
    """The built-in profile of the nearest class in `lineage` (a class's MRO as qualified
    names) that has one, else the generic profile."""
    return next((BUILTIN[name] for name in lineage if name in BUILTIN), Profile())


def load_override(profile: Profile, path: str | Path) -> Profile:
    """`profile` with the fields a JSON or TOML file gives replaced."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"profile file {path}: cannot be read ({e.strerror})") from None
    try:
        fields = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"profile file {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(fields, dict):
        raise BadInput(f"profile file {path}: expected an object of profile fields")
    try:
        return msgspec.convert(msgspec.to_builtins(profile) | fields, Profile)
    except msgspec.ValidationError as e:
        raise BadInput(f"profile file {path}: {e}") from None

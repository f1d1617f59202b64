"""Connector profiles: chosen by the resolved class or its nearest base, overridden by a file,
and what they put into vLLM's kv_transfer_config and each instance's environment."""

from __future__ import annotations

import pytest

from pdcheck.config import ConnectorSpec, EngineSpec, Role, connector_spec, model_path
from pdcheck.errors import BadInput
from pdcheck.profiles import (
    BUILTIN, EXAMPLE_CLASS, NIXL_CLASS, REFERENCE_CLASS, DecodePrompt, ExpectedLoad, FailureClass, Profile,
    load_override, profile_for,
)


def test_the_nearest_base_class_with_a_profile_gives_it():
    lineage = ["mypkg.conn.Broken", EXAMPLE_CLASS, "vllm.base.KVConnectorBase_V1", "builtins.object"]
    assert profile_for(lineage) is BUILTIN[EXAMPLE_CLASS]
    assert profile_for(["mypkg.conn.Mine", "builtins.object"]) == Profile()


@pytest.mark.parametrize("load, tokens", [(ExpectedLoad.ALL_BUT_LAST, [31, 32, 64]), (ExpectedLoad.ALL, [32, 33, 65]),
                                          (ExpectedLoad.WHOLE_BLOCKS, [32, 32, 64]),
                                          (ExpectedLoad.WHOLE_BLOCKS_BUT_LAST, [0, 32, 64])])
def test_expected_load_for_prompts_around_a_block_edge(load, tokens):
    assert [load.tokens(n, 32) for n in (32, 33, 65)] == tokens


def test_a_profile_file_overrides_the_fields_it_names(tmp_path):
    path = tmp_path / "profile.toml"
    path.write_text('lease_s = 5.0\nexpected_load = "L"\n[skips]\naborts = "no abort path yet"\n')
    profile = load_override(BUILTIN[REFERENCE_CLASS], path)
    assert (profile.lease_s, profile.expected_load) == (5.0, ExpectedLoad.ALL)
    assert profile.skip_reason(FailureClass.ABORTS) == "no abort path yet"
    assert profile.prefill_params == BUILTIN[REFERENCE_CLASS].prefill_params


@pytest.mark.parametrize("text, message", [
    ('{"lease": 3}', "unknown field"), ('{"expected_load": "L+1"}', "Invalid enum value"),
    ('{"skips": {"nothing": "x"}}', "Invalid enum value"), ('{"kv_role_decode": "reader"}', "kv_role"),
    ('{"lease_s": -1}', "negative"), ("[1]", "expected an object"), ("{", "not valid JSON"),
])
def test_a_bad_profile_file_is_bad_input_naming_the_field(tmp_path, text, message):
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(BadInput, match=message):
        load_override(Profile(), path)


def test_a_missing_profile_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="cannot be read"):
        load_override(Profile(), tmp_path / "nope.json")


def test_nixl_profile_sets_the_top_level_fields_and_roles_per_side():
    spec = ConnectorSpec("NixlConnector", profile=BUILTIN[NIXL_CLASS])
    prefill, decode = (spec.kv_transfer_config("/r", 9, role) for role in (Role.PREFILL, Role.DECODE))
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert prefill["kv_buffer_device"] == decode["kv_buffer_device"] == "cpu"


def test_each_instance_gets_its_own_side_channel_port():
    from pdcheck.cluster.instance import instance_env

    spec = EngineSpec(model=model_path("tiny-llama"), connector=ConnectorSpec("NixlConnector", profile=BUILTIN[NIXL_CLASS]))
    ports = {instance_env(spec)["VLLM_NIXL_SIDE_CHANNEL_PORT"] for _ in range(5)}
    assert len(ports) == 5 and all(p.isdigit() for p in ports)


@pytest.mark.vllm
def test_defaults_follow_the_resolved_class_not_the_name_typed():
    """A mutant subclass of ExampleConnector is driven as ExampleConnector; the reference's
    alias and its module path resolve to the same profile."""
    mutant = connector_spec("pdcheck.mutants.controls:PerturbBlockConnector")
    assert mutant.profile is not None and mutant.profile.connector == EXAMPLE_CLASS
    assert mutant.decode_prompt is DecodePrompt.WITH_FIRST_TOKEN and EXAMPLE_CLASS in mutant.lineage
    assert connector_spec("reference").profile == connector_spec("pdcheck.connector.plugin:P2PConnector").profile


@pytest.mark.vllm
def test_a_connector_that_does_not_import_is_bad_input_at_once():
    with pytest.raises(BadInput, match="does not import"):
        connector_spec("no_such_module_xyz:Conn")

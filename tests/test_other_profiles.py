"""Profiles of vLLM's other connectors: MooncakeConnector's roles and per-instance ports, and
MultiConnector's child connectors with their own settings filled in per instance."""

from __future__ import annotations

from pdcheck.config import ConnectorSpec, EngineSpec, Role, model_path
from pdcheck.profiles import BUILTIN, MOONCAKE_CLASS, MULTI_CLASS, ExpectedLoad


def spec_for(profile_class: str, name: str) -> ConnectorSpec:
    profile = BUILTIN[profile_class]
    return ConnectorSpec(name, extra_config=tuple(sorted(profile.extra_config.items())), profile=profile)


def test_mooncake_runs_tcp_with_a_producer_and_a_consumer():
    spec = spec_for(MOONCAKE_CLASS, "pdcheck.adapters.mooncake:ProxiedMooncakeConnector")
    prefill, decode = (spec.kv_transfer_config("/r", 9, role) for role in (Role.PREFILL, Role.DECODE))
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert prefill["kv_connector_extra_config"]["mooncake_protocol"] == "tcp"
    assert prefill["kv_connector_module_path"] == "pdcheck.adapters.mooncake"
    assert spec.profile.expected_load is ExpectedLoad.ALL


def test_each_mooncake_instance_gets_its_own_bootstrap_port():
    from pdcheck.cluster.instance import instance_env

    engine = EngineSpec(model=model_path("tiny-llama"), connector=spec_for(MOONCAKE_CLASS, "MooncakeConnector"))
    ports = {instance_env(engine)["VLLM_MOONCAKE_BOOTSTRAP_PORT"] for _ in range(5)}
    assert len(ports) == 5 and all(p.isdigit() for p in ports)


def test_multi_connector_children_get_the_instances_folder_and_port():
    config = spec_for(MULTI_CLASS, "MultiConnector").kv_transfer_config("/r", 9, Role.DECODE)
    nixl, store = config["kv_connector_extra_config"]["connectors"]
    assert (nixl["kv_connector"], nixl["kv_buffer_device"]) == ("NixlConnector", "cpu")
    assert store["kv_connector_extra_config"]["shared_storage_path"] == "/r/store-9"
    assert BUILTIN[MULTI_CLASS].extra_config["connectors"][1]["kv_connector_extra_config"]["shared_storage_path"] \
        == "{run_dir}/store-{port}"  # the profile itself is left as it was

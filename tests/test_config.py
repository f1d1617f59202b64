"""Config validation: bad values raise BadInput naming the field and the value."""

from __future__ import annotations

import pytest

from pdcheck.config import ConnectorSpec, DecodePrompt, EngineSpec, connector_spec, model_path
from pdcheck.errors import BadInput
from pdcheck.workload.boundary import boundary_lengths, boundary_requests


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float64"}, "dtype 'float64'"),
    ({"block_size": 16}, "block_size 16"),
    ({"max_model_len": 8}, "max_model_len 8"),
])
def test_engine_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(BadInput, match=message):
        EngineSpec(model=model_path("tiny-llama"), **kwargs)


def test_missing_model_folder_is_bad_input():
    with pytest.raises(BadInput, match="no such model folder"):
        model_path("/nonexistent")


@pytest.mark.parametrize("text, message", [("{x", "invalid JSON"), ("3", "expected a JSON object")])
def test_connector_config_must_be_a_json_object(text, message):
    with pytest.raises(BadInput, match=message):
        connector_spec("ExampleConnector", text)


def test_builtin_defaults_and_overrides():
    spec = connector_spec("ExampleConnector", '{"extra": 1}', "original")
    assert spec.decode_prompt is DecodePrompt.ORIGINAL
    assert dict(spec.extra_config) == {"shared_storage_path": "{run_dir}/kv", "extra": 1}
    config = spec.kv_transfer_config("/r", 9)
    assert config["kv_connector_extra_config"]["shared_storage_path"] == "/r/kv"
    assert "kv_connector_module_path" not in config


def test_module_and_file_connectors_name_their_module(tmp_path):
    assert ConnectorSpec("pkg.mod:Cls").module_path == "pkg.mod"
    path = tmp_path / "conn.py"
    path.write_text("")
    spec = ConnectorSpec(f"{path}:Cls")
    assert (spec.module_path, spec.module_dir, spec.class_name) == ("conn", str(tmp_path), "Cls")


def test_specs_with_json_list_values_are_hashable():
    assert hash(connector_spec("ExampleConnector", '{"target_prefix": [1, 2]}'))


def test_boundary_lengths_straddle_every_block_boundary():
    assert boundary_lengths(32, 100) == [31, 32, 33, 63, 64, 65, 95, 96, 97]


def test_boundary_requests_are_seeded_and_in_vocab():
    a = boundary_requests(1, 32, 256, 16, 512)
    assert a == boundary_requests(1, 32, 256, 16, 512) and a != boundary_requests(2, 32, 256, 16, 512)
    assert all(4 <= t < 512 for r in a for t in r.prompt)
    assert len({r.request_id for r in a}) == len(a) >= 12


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice():
    from pdcheck.cluster.instance import ephemeral_low, free_port

    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < ephemeral_low() for p in ports)


def test_serve_makes_its_run_folder_or_refuses_one_that_cannot_be_made(tmp_path, capsys):
    """A run folder that does not exist is made before the server starts (the connector writes
    its transfer log there from the first request); one that cannot be made is exit 2."""
    from pdcheck.cli import build_parser, main, serve_spec
    from pdcheck.cluster.instance import free_port

    single = ["serve", "--role", "single", "--model", "tiny-llama", "--port", str(free_port()), "--run-dir"]
    folder = tmp_path / "new" / "run"
    serve_spec(build_parser().parse_args([*single, str(folder)]))
    assert folder.is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*single, str(blocker / "run")]) == 2
    assert f"--run-dir {blocker / 'run'}: cannot be made" in capsys.readouterr().err

"""Instance placement: who gets which GPU and what share of its memory, CPU pinning as before,
and `pdcheck run --dry-run` / too few GPUs through the CLI. No engine is started."""

from __future__ import annotations

import pytest

from pdcheck import cli, config
from pdcheck.cluster import instance as instance_module
from pdcheck.cluster import placement
from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.placement import Device, Layout, Placement, choose_layout, numbered
from pdcheck.cluster.http_cluster import served_places
from pdcheck.config import ConnectorSpec, EngineSpec, Role, model_path
from pdcheck.errors import BadInput


def roles(num_prefill: int, num_decode: int) -> list[Role]:
    return [Role.SINGLE] + [Role.PREFILL] * num_prefill + [Role.DECODE] * num_decode


def gpus_and_shares(places: list[Placement]) -> list[tuple[tuple[str, ...], float | None]]:
    return [(p.gpus, p.gpu_memory_utilization) for p in places]


def test_2p2d_on_4_gpus_puts_the_oracle_and_the_last_decode_on_gpu_0_each_with_half_the_budget():
    places = Layout(Device.CUDA, numbered(4)).place(roles(2, 2))
    assert gpus_and_shares(places) == [
        (("0",), 0.45),  # oracle
        (("1",), None), (("2",), None),  # prefill0, prefill1: alone, vLLM's default share
        (("3",), None), (("0",), 0.45),  # decode0, decode1
    ]
    assert [p.env() for p in places] == [{"CUDA_VISIBLE_DEVICES": g} for g in "01230"]
    assert places[4].engine_args() == {"tensor_parallel_size": 1, "distributed_executor_backend": "uni",
                                       "gpu_memory_utilization": 0.45}


def test_4p4d_on_8_gpus_shares_only_gpu_0():
    places = Layout(Device.CUDA, numbered(8)).place(roles(4, 4))
    assert [p.gpus for p in places] == [(g,) for g in "012345670"]
    assert [p.gpu_memory_utilization for p in places] == [0.45] + [None] * 7 + [0.45]
    assert [p.cpus for p in places] == [()] * 9  # GPU instances are not pinned to one core


def test_tensor_parallel_groups_are_distinct_gpus_and_take_the_most_crowded_share():
    places = Layout(Device.CUDA, numbered(4), prefill_tp=2).place(roles(2, 2))
    assert gpus_and_shares(places) == [
        (("0",), 0.45), (("1", "2"), 0.45), (("3", "0"), 0.45), (("1",), 0.45), (("2",), 0.45),
    ]
    assert places[1].engine_args()["distributed_executor_backend"] == "mp"
    assert places[1].env() == {"CUDA_VISIBLE_DEVICES": "1,2"}


def test_shares_of_one_gpu_never_exceed_the_budget():
    places = Layout(Device.CUDA, numbered(1)).place(roles(4, 4))
    assert {p.gpu_memory_utilization for p in places} == {0.1}  # 9 instances: 0.9 / 9
    three = Layout(Device.CUDA, numbered(2)).place(roles(2, 2))  # GPU 0: oracle, prefill1, decode1
    assert gpus_and_shares(three) == [(("0",), 0.3), (("1",), 0.45), (("0",), 0.3), (("1",), 0.45), (("0",), 0.3)]


@pytest.mark.parametrize("layout, message", [
    (dict(device=Device.CUDA, gpus=numbered(2), prefill_tp=4), "--prefill-tp 4: more than the GPUs planned for"),
    (dict(device=Device.CPU, decode_tp=2), "--decode-tp 2: tensor parallelism needs --device cuda"),
    (dict(device=Device.CUDA, gpus=numbered(2), oracle_tp=0), "--oracle-tp 0: must be at least 1"),
])
def test_impossible_layouts_are_bad_input(layout, message):
    with pytest.raises(BadInput, match=message):
        Layout(**layout)


def test_cpu_placement_pins_one_core_each_round_robin_as_before(monkeypatch, tmp_path):
    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: {7, 2, 5})
    spec = EngineSpec(model=model_path("tiny-llama"), connector=ConnectorSpec("ExampleConnector"))
    deployment = Deployment(spec, tmp_path, "cpu", num_prefill=2, num_decode=2)
    assert [i.placement.cpus for i in deployment.instances] == [(2,), (5,), (7,), (2,), (5,)]
    assert all(i.placement.engine_args() == {} for i in deployment.instances)
    assert all("CUDA_VISIBLE_DEVICES" not in i.env for i in deployment.instances)
    assert not (tmp_path / "cpu").exists()  # made, not started


def test_served_instances_refuse_places_pdcheck_serve_cannot_pass():
    assert len(served_places(Layout(Device.CUDA, numbered(3)), roles(1, 1))) == 3
    with pytest.raises(BadInput, match="does not pass to vLLM yet"):
        served_places(Layout(Device.CUDA, numbered(2)), roles(1, 1))


def test_visible_gpus_keep_the_parents_cuda_visible_devices_names(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    layout = choose_layout(None, None, False)
    assert layout == Layout(Device.CUDA, ("5", "7"))
    assert [p.env() for p in layout.place(roles(1, 1))] == [{"CUDA_VISIBLE_DEVICES": g} for g in "575"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["run", *argv])
    return code, capsys.readouterr().err


@pytest.fixture
def no_resolving(monkeypatch):
    """The connector's profile without asking a vLLM child process which class it is."""
    monkeypatch.setattr(config, "connector_lineage", lambda spec: [])


def test_dry_run_prints_the_2p2d_plan_for_4_gpus_and_starts_nothing(capsys, tmp_path, no_resolving):
    code, err = run_cli(capsys, "--dry-run", "--gpus", "4", "--topology", "2P2D", "--model", "tiny-llama",
                        "--dtype", "bfloat16", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    rows = {line.split()[0]: line for line in err.splitlines() if line.split()[:1] in
            (["oracle"], ["prefill0"], ["prefill1"], ["decode0"], ["decode1"])}
    assert "on cuda (4 GPUs 0,1,2,3)" in err
    for name, gpu in {"oracle": "0", "prefill0": "1", "prefill1": "2", "decode0": "3", "decode1": "0"}.items():
        assert f"CUDA_VISIBLE_DEVICES={gpu} " in rows[name], rows[name]
    assert "gpu_memory_utilization=0.45" in rows["decode1"] and "gpu_memory_utilization" not in rows["decode0"]
    assert "kv=" in rows["prefill0"] and "kv_role=" in rows["decode0"]
    assert not (tmp_path / "runs").exists()
    assert instance_module._context is None  # no engine forkserver either


def test_tensor_parallel_reference_instances_are_refused_before_the_plan(capsys, tmp_path, no_resolving):
    code, err = run_cli(capsys, "--dry-run", "--gpus", "4", "--decode-tp", "2", "--connector", "reference",
                        "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "tensor-parallel size 2 with the reference connector" in err, err
    assert "plan:" not in err and not (tmp_path / "runs").exists()


def test_a_real_run_on_too_few_gpus_exits_2_naming_both_counts(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(placement, "visible_gpus", lambda: ("0", "1"))
    monkeypatch.setattr(cli, "engine_specs", lambda args: pytest.fail("engine specs made for a refused run"))
    code, err = run_cli(capsys, "--gpus", "4", "--topology", "2P2D", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "--gpus 4: this machine has 2 GPUs 0,1" in err
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(placement, "visible_gpus", lambda: ())
    code, err = run_cli(capsys, "--device", "cuda", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "--device cuda: this machine has no CUDA GPU" in err

"""Aborts: the client abandons a request between the legs, so its decode leg is never sent.

Prefill has saved the request's KV and holds its blocks for a pull that never comes. The
reference connector drops KV nobody pulls after `hold_s` and hands the blocks back: the
abandoned request ends as a clean error, every other request matches, and after the drain no
instance holds anything. The abort comes from the seeded nemesis (`pdcheck run --nemesis
SEED`) and is written to the history. Negative control: KeepUnpulled keeps unpulled KV
forever (leaks on abort); the abandoned request is classed `leak`, and its repro, which carries
the fault, replays to the same leak. In put mode the KV waits in decode's receive buffer
instead, and is dropped there after the hold.
"""

from __future__ import annotations

import json

import pytest

from pdcheck.cli import main
from pdcheck.client.legs import ABANDONED
from pdcheck.config import connector_spec
from pdcheck.faults.process import plan
from pdcheck.history import Fault, read_history
from pdcheck.types import Planned

pytestmark = pytest.mark.vllm
SEED, LENGTHS = 7, [33, 65, 95]
DRAIN_S = 5  # the 2 s hold, with room to spare


def settings(mode: str) -> str:
    return json.dumps(dict(connector_spec("reference", json.dumps({"hold_s": 2, "mode": mode})).extra_config))


def run(tmp_path, capfd, connector: str, mode: str = "get") -> tuple[int, str, dict]:
    runs = tmp_path / "runs"
    code = main(["run", "--model", "tiny-llama", "--dtype", "bfloat16", "--connector", connector,
                 "--connector-config", settings(mode), "--lengths", ",".join(map(str, LENGTHS)), "--nemesis", str(SEED),
                 "--drain-s", str(DRAIN_S), "--runs-dir", str(runs)])
    results = json.loads((runs / "latest" / "results.json").read_text())
    return code, capfd.readouterr().err, results


def test_the_seed_abandons_the_second_request_only():
    assert plan(SEED, len(LENGTHS)) == [Planned(1, "abort", 0.0)]


@pytest.mark.parametrize("mode", ["get", "put"])
def test_reference_connector_frees_what_an_abandoned_request_held(mode, tmp_path, capfd):
    """get: prefill holds the KV for a pull that never comes; put: decode's receive buffer holds
    the KV pushed for it. Either way it is let go after the hold."""
    code, err, results = run(tmp_path, capfd, "reference", mode)
    assert code == 0 and "verdict: valid" in err, err
    (config,) = results["configs"]
    outcomes = [(r["prompt_len"], r["verdict"]["outcome"], r["faulted"], r["leak"]) for r in config["requests"]]
    assert outcomes == [(33, "match", False, None), (65, "error", True, None), (95, "match", False, None)], outcomes
    assert config["requests"][1]["verdict"]["detail"] == ABANDONED
    assert config["leaks"] == []
    history = read_history(tmp_path / "runs" / "latest" / "history.jsonl")
    aborts = [(op.phase, op.batch) for op in history if isinstance(op, Fault) and op.fault == "abort"]
    assert aborts == [("inject", 1), ("heal", 1)], aborts


def test_keeping_unpulled_kv_is_caught_as_a_leak_of_each_abandoned_request(tmp_path, capfd):
    code, err, results = run(tmp_path, capfd, "pdcheck.mutants.connector:KeepUnpulled")
    assert code == 1, err
    (config,) = results["configs"]
    leaked = [(r["prompt_len"], r["leak"]) for r in config["requests"] if r["leak"]]
    assert leaked == [(65, "prefill0 still holds it after the drain")], leaked
    assert [leak.split(":")[0] for leak in config["leaks"]] == ["prefill0"], config["leaks"]
    assert "--nemesis 7" in err and "reproduce: pdcheck repro" in err, err
    repro = tmp_path / "runs" / "latest" / "repro-65-tiny-llama-bfloat16.json"
    assert json.loads(repro.read_text())["faults"] == [{"batch": 1, "target": "abort", "seconds": 0.0}]
    assert main(["repro", str(repro), "--runs-dir", str(tmp_path / "replays")]) == 0
    assert "reproduced: leak prefill0 still holds it after the drain" in capfd.readouterr().err


"""`gate.run_config`, the one way to run a configuration: whatever happens it heals every fault
it injected; after the workload it drains every instance and charges a request still held to
that request, in a result that is never changed afterwards. Driven through a scripted cluster
whose decode instance is a real process (a fault pauses it)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from pdcheck.client.http import ProxyClient
from pdcheck.errors import BadInput, InstanceFailed
from pdcheck.gate import run_config
from pdcheck.history import Completion, History, Note, read_history
from pdcheck.profiles import Profile
from pdcheck.types import Calibration, EngineState, GenRequest, GenResult, PDResult, Planned, Rule

STRICT = Calibration(Rule.STRICT, 0.0, 0.0, "stable")
TOKENS = [5, 6, 7, 8]


def answer(request_id: str) -> GenResult:
    return GenResult(request_id, TOKENS, [-0.5] * 4, [{t: -0.5} for t in TOKENS])


class ScriptedCluster:
    """1P1D, its own client: every request answered with the oracle's tokens (or `fails` raised
    on the batch it names); decode holds `held` after the drain."""

    topology = "1P1D"

    def __init__(self, process, held: tuple[str, ...] = (), fails: int | None = None):
        self.spec = SimpleNamespace(label="scripted", block_size=32,
                                    connector=SimpleNamespace(profile=Profile(), lineage=()))
        self.fails, self.revived = fails, 0
        self.instances = [SimpleNamespace(name=name, process=process, drain=lambda _, held=held: EngineState(0, 0, 0, held))
                          for name, held in (("prefill0", ()), ("decode0", held))]

    def client(self):
        return self

    def pair(self, batch):
        return tuple(self.instances)

    def send(self, requests, batch, deadline_s, between=None):
        if batch == self.fails:
            raise InstanceFailed("decode0 stopped answering")
        return [PDResult(answer(r.request_id), 0, GenResult(r.request_id)) for r in requests]

    def transfers(self):
        return {}

    def revive(self):
        self.revived += 1


ORACLE = SimpleNamespace(calibration=STRICT, results=lambda rs: [answer(r.request_id) for r in rs])
REQUESTS = [GenRequest(f"r{i}-len8", list(range(8)), 4) for i in range(3)]


@pytest.fixture
def process():
    child = subprocess.Popen(["sleep", "60"])
    yield child
    child.kill()
    child.wait()


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "history.jsonl")
    yield h
    h.close()


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_request_still_held_after_the_drain_is_charged_to_it_and_completed_once(process, history):
    cluster = ScriptedCluster(process, held=("r1-len8",))
    result = run_config(cluster, REQUESTS, history, oracle=ORACLE)
    assert [c.leak for c in result.requests] == [None, "decode0 still holds it after the drain", None]
    assert [c.passed for c in result.requests] == [True, False, True]
    assert result.leaks == (f"decode0: {EngineState(0, 0, 0, ('r1-len8',))}",) and cluster.revived == 1
    ops = read_history(history.path)
    assert [op.request_id for op in ops if isinstance(op, Completion)] == [r.request_id for r in REQUESTS]
    assert [op.instance for op in ops if isinstance(op, Note) and op.instance] == ["prefill0", "decode0"]
    with pytest.raises(AttributeError):
        result.requests[0].leak = None  # immutable: what was judged stays judged


def test_a_fault_is_healed_when_the_workload_fails_under_it(process, history):
    cluster = ScriptedCluster(process, fails=0)
    with pytest.raises(InstanceFailed):
        run_config(cluster, REQUESTS, history, oracle=ORACLE, faults=[Planned(0, "decode", 30.0)])
    assert state(process.pid) != "T", "decode0 is still paused after run_config failed"


def test_the_fault_plan_is_part_of_the_result(process, history):
    faults = (Planned(1, "decode", 0.1),)
    result = run_config(ScriptedCluster(process), REQUESTS, history, oracle=ORACLE, faults=faults)
    assert result.faults == faults and [c.faulted for c in result.requests] == [False, True, False]
    assert msgspec.json.decode(msgspec.json.encode(result), type=type(result)) == result


def test_faults_through_a_proxy_are_refused_before_anything_is_sent(process, history):
    with pytest.raises(BadInput, match="does not pick"):
        run_config(ScriptedCluster(process), REQUESTS, history, oracle=ORACLE,
                   client=ProxyClient("http://127.0.0.1:9", "m"), faults=[Planned(0, "decode", 1.0)])
    assert read_history(history.path) == []

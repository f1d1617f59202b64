"""Faults as one protocol: every fault a name, `inject()` and `heal()`; every schedule's
`heal_all()` heals what it injected and is still injected, once. Process faults act on a real
(sleeping) process; plans written as strings before FaultKind still decode to the same plan."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest

from pdcheck.faults.api import Fault, FaultSchedule
from pdcheck.faults.client import faults_on
from pdcheck.faults.hooks import Hook, Hooks
from pdcheck.faults.process import KINDS, PAUSES, Nemesis, plan
from pdcheck.history import Fault as FaultOp
from pdcheck.types import FaultKind, GenRequest, Planned


class Recorder:
    """A history that keeps each fault step as (fault, phase, batch or command)."""

    def __init__(self):
        self.steps = []

    def record(self, op: FaultOp):
        self.steps.append((op.fault, op.phase, op.command if op.batch is None else op.batch))


class Process:
    """A sleeping process as an instance's `process` (pid, join)."""

    def __init__(self):
        self.popen = subprocess.Popen(["sleep", "60"])
        self.pid = self.popen.pid

    def join(self, timeout):
        self.popen.wait(timeout)

    def state(self) -> str:
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class Instance:
    def __init__(self, name: str):
        self.name, self.process, self.restarts = name, Process(), 0

    def restart(self):
        self.restarts += 1
        self.process = Process()


@pytest.fixture
def pair():
    instances = (Instance("prefill0"), Instance("decode0"))
    yield instances
    for instance in instances:
        instance.process.popen.kill()
        instance.process.popen.wait()


def wait_for_state(process: Process, wanted: str, timeout_s: float = 5.0) -> str:
    end = time.monotonic() + timeout_s
    while process.state() != wanted and time.monotonic() < end:
        time.sleep(0.01)
    return process.state()


def test_repro_files_written_with_string_kinds_decode_to_the_same_plan():
    old = b'[{"batch": 0, "target": "prefill", "seconds": 1.5}, {"batch": 1, "target": "decode", "seconds": 0.5},' \
          b' {"batch": 2, "target": "abort", "seconds": 0.0}, {"batch": 3, "target": "kill", "seconds": 0.0},' \
          b' {"batch": 4, "target": "restart", "seconds": 0.0}]'
    faults = msgspec.json.decode(old, type=list[Planned])
    assert [f.target for f in faults] == list(FaultKind)
    assert json.loads(msgspec.json.encode(faults)) == json.loads(old)
    assert Planned(2, "abort", 0.0) == faults[2]  # a plan spelled with strings is the same plan
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'[{"batch": 0, "target": "pause", "seconds": 1}]', type=list[Planned])


def test_seeded_plans_are_unchanged_by_the_kinds_being_an_enum():
    assert plan(7, 3) == [Planned(1, FaultKind.ABORT, 0.0)]
    faults = plan(3, 40, rate=0.5, kinds=PAUSES)
    assert faults and {f.target for f in faults} <= set(PAUSES) and all(0.3 <= f.seconds <= 2.5 for f in faults)
    assert all(f.seconds == 0.0 for f in plan(1, 40, kinds=KINDS) if f.target is FaultKind.ABORT)


def test_a_decode_pause_stops_its_process_until_heal_all_heals_it_once(pair):
    prefill, decode = pair
    history = Recorder()
    nemesis = Nemesis([Planned(0, FaultKind.PAUSE_DECODE, 30.0)], history)
    assert not nemesis.due(0, "between", *pair)  # a decode pause is due as the batch starts
    assert not nemesis.due(0, "start", *pair)
    assert wait_for_state(decode.process, "T") == "T" and prefill.process.state() == "S"
    nemesis.heal_all()
    nemesis.heal_all()
    assert wait_for_state(decode.process, "S") == "S"
    assert history.steps == [("pause", "inject", 0), ("pause", "heal", 0)]
    assert nemesis.faulted(0) and not nemesis.faulted(1)


def test_a_pause_heals_itself_when_its_time_is_up(pair):
    history = Recorder()
    nemesis = Nemesis([Planned(2, "prefill", 0.1)], history)
    nemesis.due(2, "between", *pair)
    assert wait_for_state(pair[0].process, "S") == "S"
    time.sleep(0.05)
    nemesis.heal_all()  # already healed on its timer: nothing more
    assert history.steps == [("pause", "inject", 2), ("pause", "heal", 2)]


def test_an_abort_abandons_its_batch_between_the_legs_as_a_point_fault(pair):
    history = Recorder()
    nemesis = Nemesis([Planned(1, FaultKind.ABORT, 0.0)], history)
    assert not nemesis.due(0, "between", *pair) and not nemesis.due(1, "start", *pair)
    assert nemesis.due(1, "between", *pair)
    nemesis.heal_all()
    assert history.steps == [("abort", "inject", 1), ("abort", "heal", 1)]


def test_a_kill_leaves_prefill_dead_and_a_restart_starts_it_again(pair):
    prefill, _ = pair
    history = Recorder()
    killed = prefill.process
    nemesis = Nemesis([Planned(0, FaultKind.KILL, 0.0), Planned(1, FaultKind.RESTART, 0.0)], history)
    assert not nemesis.due(0, "between", *pair)
    assert killed.popen.poll() is not None and prefill.restarts == 0
    prefill.process = restarted = Process()  # its deployment starts it again before its next batch
    assert not nemesis.due(1, "between", *pair)
    nemesis.heal_all()
    assert restarted.popen.poll() is not None
    assert prefill.restarts == 1 and prefill.process.popen.poll() is None
    assert history.steps == [("kill", "inject", 0), ("kill", "inject", 1), ("kill", "heal", 1)]


def test_hooks_run_at_their_request_and_heal_all_runs_each_heal_left_once(tmp_path):
    history = Recorder()
    marks = tmp_path / "marks"
    hooks = Hooks([Hook(1, f"echo hook >> {marks}", False), Hook(2, f"echo early >> {marks}", True),
                   Hook(9, f"echo late >> {marks}", True)], history)
    hooks.before([0])
    assert not marks.exists()
    hooks.before([1, 2])
    hooks.before([1, 2])  # each runs once
    hooks.heal_all()
    hooks.heal_all()
    assert marks.read_text().split() == ["hook", "early", "late"]
    assert [step[:2] for step in history.steps] == [("hook", "inject"), ("hook", "heal"), ("hook", "heal")]


def test_a_bad_hook_is_refused_with_its_option():
    with pytest.raises(ValueError, match="--heal 'soon:true'"):
        Hook.parse("soon:true", True)
    assert Hook.parse(" 3: kill -STOP 1", False) == Hook(3, "kill -STOP 1", False)


class Streaming(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for i in range(5):
                self.wfile.write(f"data: {{\"chunk\": {i}}}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed it: the fault under test

    def log_message(self, *args):
        pass


def test_client_faults_are_acted_out_and_written_as_points():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Streaming)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    history = Recorder()
    try:
        faults = faults_on(f"http://127.0.0.1:{server.server_address[1]}", "m", GenRequest("x", [5] * 31, 4), history)
        for fault in faults:
            fault.inject()
            fault.heal()
    finally:
        server.shutdown()
        server.server_close()
    assert [f.request.request_id for f in faults] == ["abort-mid-stream-len31", "disconnect-len31"]
    assert [step[:2] for step in history.steps] == [("abort-mid-stream", "act"), ("disconnect", "act")]


def test_every_fault_has_a_name_inject_and_heal(pair, tmp_path):
    history = Recorder()
    nemesis = Nemesis([Planned(0, FaultKind.ABORT, 0.0)], history)
    nemesis.due(0, "between", *pair)
    hooks = Hooks([Hook(0, "true", False)], history)
    client = faults_on("http://127.0.0.1:9", "m", GenRequest("x", [1], 1), history)
    faults = [*nemesis.injected, *hooks.commands, *client]
    assert all(isinstance(f, Fault) and f.name for f in faults), faults
    assert isinstance(nemesis, FaultSchedule) and isinstance(hooks, FaultSchedule)


def test_a_disconnect_refused_by_a_closed_port_is_an_error_not_a_hang():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (_, disconnect) = faults_on(f"http://127.0.0.1:{port}", "m", GenRequest("x", [1], 1), Recorder())
    with pytest.raises(ConnectionRefusedError):
        disconnect.inject()

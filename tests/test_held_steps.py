"""Between batches an engine whose scheduler still has requests keeps stepping, as vLLM's engine
core loop does, until the next message; and the Mooncake adapter gives decode what vLLM's
Mooncake proxy would."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
import types

import pytest

from pdcheck.cluster.worker import step_while_held


class FakeEngine:
    """An engine whose scheduler holds a finished request for `held_steps` steps."""

    def __init__(self, held_steps: int):
        self.steps, self.held_steps = 0, held_steps
        scheduler = types.SimpleNamespace(has_requests=lambda: self.steps < self.held_steps)
        self.engine_core = types.SimpleNamespace(engine_core=types.SimpleNamespace(scheduler=scheduler))

    def step(self):
        self.steps += 1
        return []


def test_an_engine_holding_requests_steps_until_it_holds_none():
    ours, _theirs = multiprocessing.Pipe()
    engine = FakeEngine(held_steps=3)
    step_while_held(engine, ours)
    assert engine.steps == 3


def test_the_next_message_ends_the_steps_at_once():
    ours, theirs = multiprocessing.Pipe()
    theirs.send_bytes(b"batch")
    engine = FakeEngine(held_steps=10**9)
    step_while_held(engine, ours)
    assert engine.steps == 0 and ours.recv_bytes() == b"batch"


def test_an_engine_holding_nothing_is_not_stepped():
    ours, _theirs = multiprocessing.Pipe()
    engine = FakeEngine(held_steps=0)
    step_while_held(engine, ours)
    assert engine.steps == 0


MOONCAKE_CHECK = """
import types
from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.mooncake_connector import MooncakeConnector
from pdcheck.adapters.mooncake import ProxiedMooncakeConnector

MooncakeConnector.update_state_after_alloc = lambda self, *a: None
MooncakeConnector.request_finished = lambda self, request, blocks: (bool(blocks), None)
connector = ProxiedMooncakeConnector.__new__(ProxiedMooncakeConnector)
connector.engine_id = "engine-p"
request = types.SimpleNamespace(request_id="r-1-ab12", kv_transfer_params={"do_remote_decode": True})
connector.update_state_after_alloc(request, None, 0)
assert connector.request_finished(request, [3, 4]) == (True, {
    "do_remote_prefill": True, "remote_engine_id": "engine-p",
    "remote_bootstrap_addr": "http://127.0.0.1:41234", "transfer_id": "pdcheck-r-1-ab12"})
assert connector.request_finished(request, []) == (False, None)  # nothing held: nothing to pull
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_mooncake_prefill_returns_the_parameters_its_proxy_would_give_decode(tmp_path):
    """In a child process: importing vLLM leaves cache files in the temp folder it is given."""
    env = os.environ | {"VLLM_MOONCAKE_BOOTSTRAP_PORT": "41234", "TMPDIR": str(tmp_path),
                        "VLLM_CACHE_ROOT": str(tmp_path / "vllm"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    done = subprocess.run([sys.executable, "-c", MOONCAKE_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]

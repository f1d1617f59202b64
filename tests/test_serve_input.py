"""Bad input to `pdcheck serve`: refused at start with one error line naming it, exit 2, before
any engine starts, nothing left running.

Each case runs the real CLI in a subprocess whose imports are watched: a `sitecustomize` on its
path ends it (exit 99) the moment it imports the module named in PDCHECK_REFUSE_IMPORT. Input
that needs no vLLM to judge must be refused before `vllm` is imported; settings only the
connector can judge, before vLLM's server (which starts the engine) is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from pdcheck.cluster.instance import free_port

SERVER_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
WATCH = """\
import os, sys

class RefuseImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("PDCHECK_REFUSE_IMPORT"):
            sys.stderr.write(f"imported {name}: the input was not refused in time\\n")
            sys.stderr.flush()
            os._exit(99)
        return None

sys.meta_path.insert(0, RefuseImport())
"""


def tagged_processes(tag: str) -> list[str]:
    """Processes still running with this test's tag in their environment (the CLI passes its
    environment to everything it starts), so other tests' processes never count."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("PDCHECK_TEST_TAG") == tag:
                found.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def serve(tmp_path: Path, args: list[str], refuse_import: str) -> tuple[subprocess.CompletedProcess, str]:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    (watch / "sitecustomize.py").write_text(WATCH)
    tag = uuid.uuid4().hex
    env = dict(os.environ, PDCHECK_TEST_TAG=tag, PDCHECK_REFUSE_IMPORT=refuse_import,
               PYTHONPATH=os.pathsep.join(filter(None, [str(watch), os.environ.get("PYTHONPATH")])),
               TMPDIR=str(tmp_path), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    if "--run-dir" not in args:
        args = [*args, "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "pdcheck.cli", "serve", "--model", "tiny-llama", *args],
                          capture_output=True, text=True, timeout=180, env=env)
    return proc, tag


@pytest.fixture
def busy_port():
    """A port another socket is bound to and listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def prefill(kv_port: int | None = None, port: int | None = None) -> list[str]:
    return ["--role", "prefill", "--proxy", "127.0.0.1:9", "--port", str(port or free_port()),
            "--kv-port", str(kv_port or free_port())]


def prefill_on_one_port() -> list[str]:
    port = free_port()
    return prefill(kv_port=port, port=port)


def profile_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "profile.json"
    path.write_text(text)
    return str(path)


def file_in_the_way(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "run")


# each case: (arguments given tmp_path and a busy port, what the error line must name)
CASES = {
    "port-in-use": (lambda tmp, busy: ["--role", "single", "--port", str(busy)], "--port {busy}: already in use"),
    "kv-port-in-use": (lambda tmp, busy: prefill(kv_port=busy), "--kv-port {busy}: already in use"),
    "kv-port-is-the-http-port": (lambda tmp, busy: prefill_on_one_port(), "the same as --port"),
    "port-out-of-range": (lambda tmp, busy: ["--role", "single", "--port", "70000"], "--port 70000: expected a port"),
    "connector-config-not-json": (lambda tmp, busy: [*prefill(), "--connector-config", "{port: 1"],
                                  "--connector-config: invalid JSON"),
    "connector-config-not-an-object": (lambda tmp, busy: [*prefill(), "--connector-config", "[1, 2]"],
                                       "--connector-config: expected a JSON object, got list"),
    "profile-missing": (lambda tmp, busy: [*prefill(), "--profile", str(tmp / "nope.json")], "cannot be read"),
    "profile-not-json": (lambda tmp, busy: [*prefill(), "--profile", profile_file(tmp, "{lease_s")], "not valid JSON"),
    "profile-unknown-field": (lambda tmp, busy: [*prefill(), "--profile", profile_file(tmp, '{"lease": 3}')],
                              "unknown field `lease`"),
    "run-dir-cannot-be-made": (lambda tmp, busy: ["--role", "single", "--port", str(free_port()),
                                                  "--run-dir", file_in_the_way(tmp)], "cannot be made"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_serve_refuses_bad_input_before_importing_vllm(case, tmp_path, busy_port):
    args, message = CASES[case]
    proc, tag = serve(tmp_path, args(tmp_path, busy_port), refuse_import="vllm")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("pdcheck: error:"), proc.stderr[-2000:]
    assert message.format(busy=busy_port) in lines[0], lines[0]
    assert tagged_processes(tag) == []


@pytest.mark.vllm
@pytest.mark.parametrize("settings, message", [
    ({"no_such_setting": 1}, "unknown reference connector settings: ['no_such_setting']"),
    ({"mode": "sideways", "hold_s": 5}, "mode 'sideways': not a valid value"),
], ids=["unknown-setting", "bad-mode"])
def test_serve_refuses_reference_settings_before_the_engine_starts(settings, message, tmp_path):
    proc, tag = serve(tmp_path, [*prefill(), "--connector", "reference", "--connector-config", json.dumps(settings)],
                      refuse_import=SERVER_ENTRY)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pdcheck: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "the reference connector refuses it" in errors[0] and message in errors[0], errors
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert tagged_processes(tag) == []


@pytest.mark.parametrize("key, raw", [("deadline_s", [1]), ("port", {"p": 1}), ("buffer_bytes", None)])
def test_reference_settings_of_the_wrong_json_type_are_refused_as_value_errors(key, raw):
    """The start check (and the connector) catch ValueError: a list where a number belongs
    raised TypeError, which the check would not have turned into one error line."""
    from pdcheck.connector.config import P2PConfig

    with pytest.raises(ValueError, match=f"{key} .*: not a valid value"):
        P2PConfig.from_extra({"port": 1, key: raw})

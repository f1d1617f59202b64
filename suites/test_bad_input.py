"""Bad input to `pdcheck run`: a one-line error naming the problem, exit 2, nothing left running.

Each case runs the real CLI in a subprocess. Cases that can only be judged by vLLM (connector
names and classes) start instances, which must all be stopped before the CLI exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

DATA = Path(__file__).parent / "data"
BASE = ["--model", "tiny-llama", "--dtype", "float32", "--lengths", "33"]

CASES = {
    "unknown-connector-name": (["--connector", "NoSuchConnector"], "not a vLLM built-in connector"),
    "module-does-not-import": (["--connector", "no_such_module_xyz:Conn"], "does not import"),
    "class-is-not-a-connector": (["--connector", f"{DATA / 'not_a_connector.py'}:NotAConnector"],
                                 "is not a vLLM KV connector class"),
    "missing-connector-file": (["--connector", f"{DATA / 'missing.py'}:Conn"], "does not exist"),
    "missing-model-folder": (["--model", "/nonexistent/model"], "no such model folder"),
    "invalid-json-config": (["--connector-config", "{not json"], "invalid JSON"),
    "json-config-not-an-object": (["--connector-config", "[1, 2]"], "expected a JSON object"),
    "no-prompt-of-that-length": (["--lengths", "7"], "no workload prompt"),
    "missing-profile-file": (["--profile", "/nonexistent/profile.json"], "cannot be read"),
}
NEEDS_VLLM = {"unknown-connector-name", "module-does-not-import", "class-is-not-a-connector"}


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


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.vllm] * (c in NEEDS_VLLM)) for c in CASES],
                         ids=list(CASES))
def test_bad_input_gives_one_line_error_and_exit_2(case, tmp_path):
    args, message = CASES[case]
    tag = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "pdcheck.cli", "run", *BASE, *args, "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PDCHECK_TEST_TAG=tag),
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pdcheck: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert tagged_processes(tag) == []


@pytest.mark.vllm
def test_a_deployment_that_fails_to_start_leaves_nothing_half_started_in_the_pool(pd_run_dir):
    from pdcheck.cluster.pool import DeploymentPool
    from pdcheck.config import ConnectorSpec, EngineSpec, model_path
    from pdcheck.errors import BadInput

    pool = DeploymentPool(pd_run_dir / "pool-failing-start")
    spec = EngineSpec(model=model_path("tiny-llama"), connector=ConnectorSpec("no_such_module_xyz:Conn"))
    try:
        with pytest.raises(BadInput, match="does not import"):
            pool.get(spec)
        assert not pool.alive and not pool.starting
        assert all(oracle.instance.alive for oracle in pool.oracles.values()), "a dead oracle kept for the next test"
    finally:
        pool.close()

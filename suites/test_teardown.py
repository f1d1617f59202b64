"""Teardown: `pdcheck run` stopped by Ctrl-C, or killed outright, leaves no process behind.

Ctrl-C (SIGINT to the whole process group, as a terminal sends it) must stop every instance
and exit 130. SIGKILL gives the CLI no chance to clean up; its workers must still die, since
each asks the kernel to kill it when its parent goes, and the forkserver exits with its owner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

RUN = ["-m", "pdcheck.cli", "run", "--model", "tiny-llama", "--dtype", "float32"]


def start_run(tmp_path) -> subprocess.Popen:
    """`pdcheck run` as a terminal starts it. Its SIGINT is set back to the default: pytest may
    itself run with SIGINT ignored (started as a background job of a script, which ignores it in
    all it starts), and a process that inherits an ignored SIGINT never sees Ctrl-C."""
    # a SIGKILLed Python cannot remove multiprocessing's temp folder: keep it out of /tmp
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.Popen(
        [sys.executable, *RUN, "--runs-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_workers(proc: subprocess.Popen, count: int, timeout_s: float = 120) -> list[psutil.Process]:
    """The run's engine workers once `count` of them are alive."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        # workers are forked by the forkserver, the CLI's child
        workers = [w for server in psutil.Process(proc.pid).children() for w in server.children()]
        if len(workers) >= count:
            return workers
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"fewer than {count} workers started within {timeout_s}s")


def all_gone(processes: list[psutil.Process], timeout_s: float = 30) -> list[int]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p.pid for p in alive]


def group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


@pytest.mark.vllm
def test_ctrl_c_stops_every_instance_and_exits_130(tmp_path):
    proc = start_run(tmp_path)
    workers = wait_for_workers(proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the CLI prints its threads' stacks
        time.sleep(1)
        proc.kill()
        pytest.fail(f"still running 60s after Ctrl-C:\n{proc.communicate()[1][-4000:]}")
    assert proc.returncode == 130, proc.stderr.read()[-2000:]
    assert all_gone(workers) == []
    assert all_gone(group_members(proc.pid)) == []


@pytest.mark.vllm
def test_killed_cli_leaves_no_worker_behind(tmp_path):
    proc = start_run(tmp_path)
    workers = wait_for_workers(proc, 3)
    others = group_members(proc.pid)
    proc.kill()
    proc.wait(10)
    assert all_gone(workers) == []
    assert all_gone(others, timeout_s=60) == []

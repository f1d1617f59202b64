"""Reproducers: a failing `pdcheck run` writes repro-*.json with a `pdcheck repro` line; the
replay shows the same failure (exit 0), shrinking keeps only the requests it needs, and a repro
whose connector is no longer broken says it did not reproduce (exit 1). Bad repro files are
refused with exit 2.
"""

from __future__ import annotations

import os

import msgspec
import pytest

from pdcheck.cli import main
from pdcheck.repro.case import read, write
from pdcheck.types import GenRequest

BROKEN = ["--connector", "pdcheck.mutants.connector:CorruptOnLoad", "--connector-config", '{"port": "{port}"}',
          "--model", "tiny-llama", "--dtype", "bfloat16"]


def failing_run(tmp_path, capfd):
    """`pdcheck run` on a corrupting connector: exit 1, and the repro of its 65-token request."""
    runs = tmp_path / "runs"
    assert main(["run", *BROKEN, "--lengths", "33,65", "--runs-dir", str(runs)]) == 1
    out = capfd.readouterr().err
    path = runs / "latest" / "repro-65-tiny-llama-bfloat16.json"
    assert "reproduce: pdcheck repro" in out and path.name in out, out
    repro = read(path)
    assert [len(r.prompt) for r in repro.requests] == [33, 65] and repro.outcome == "diverged"
    report = (runs / "latest" / "report.html").read_text()
    assert "r-len65: diverged" in report and 'data-outcome="diverged" data-failed="1"' in report
    return runs, path, repro


@pytest.mark.vllm
def test_a_failure_replays_and_says_when_it_no_longer_fails(tmp_path, capfd):
    runs, path, repro = failing_run(tmp_path, capfd)
    assert main(["repro", str(path), "--runs-dir", str(runs)]) == 0
    assert "reproduced: diverged" in capfd.readouterr().err
    fixed = msgspec.structs.replace(repro, connector=dict(repro.connector, name="pdcheck.connector.plugin:P2PConnector"))
    assert main(["repro", str(write(fixed, tmp_path / "fixed.json")), "--runs-dir", str(runs)]) == 1
    assert "did not reproduce: the request now ends as match" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.vllm
def test_shrinking_a_real_failure_keeps_only_the_failing_request(tmp_path, capfd):
    runs, path, _ = failing_run(tmp_path, capfd)
    assert main(["repro", str(path), "--shrink", "--runs-dir", str(runs)]) == 0
    assert "shrunk from 2 to 1 requests" in capfd.readouterr().err
    assert [len(r.prompt) for r in read(path.with_name(path.stem + ".min.json")).requests] == [65]


@pytest.mark.parametrize("needed, kept", [({"r3", "r5"}, ["r3", "r5", "failing"]), (set(), ["failing"]),
                                          ({"r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"}, None)])
def test_shrinking_drops_every_earlier_request_the_failure_does_not_need(needed, kept):
    from pdcheck.repro.case import Repro, shrink

    requests = [GenRequest(f"r{i}", [5, i], 4) for i in range(8)] + [GenRequest("failing", [9], 4)]
    repro = Repro({}, {}, (1, 1), 0, requests, "diverged")
    attempts = []

    def fails(candidate) -> bool:
        attempts.append(candidate)
        sent = candidate.requests
        return sent[-1].request_id == "failing" and needed <= {r.request_id for r in sent}

    smaller = shrink(repro, fails)
    assert [r.request_id for r in smaller.requests] == (kept or [r.request_id for r in requests])
    assert len(attempts) <= 2 * len(requests), f"{len(attempts)} replays"


def test_shrinking_drops_faults_the_failure_does_not_need_and_moves_the_rest_with_their_requests():
    """Faults go first, one at a time; then requests, each fault staying on its request (whose
    index changes as earlier requests go) or going with it."""
    from pdcheck.repro.case import Repro, shrink
    from pdcheck.types import Planned

    requests = [GenRequest(f"r{i}", [5, i], 4) for i in range(6)] + [GenRequest("failing", [9], 4)]
    faults = [Planned(1, "prefill", 1.0), Planned(3, "abort", 0.0), Planned(4, "decode", 0.5), Planned(6, "abort", 0.0)]
    repro = Repro({}, {}, (1, 1), 0, requests, "leak", faults=faults)

    def fails(candidate) -> bool:  # needs r3 aborted and the failing request aborted
        hit = {candidate.requests[f.batch].request_id: f.target for f in candidate.faults}
        return hit.get("r3") == "abort" and hit.get("failing") == "abort"

    smaller = shrink(repro, fails)
    assert [r.request_id for r in smaller.requests] == ["r3", "failing"]
    assert smaller.faults == [Planned(0, "abort", 0.0), Planned(1, "abort", 0.0)]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{}", "not a pdcheck repro"),
    ("[1, 2]", "not a pdcheck repro"),
])
def test_bad_repro_files_are_refused(tmp_path, capfd, content, message):
    path = tmp_path / "repro.json"
    if content is not None:
        path.write_text(content)
    assert main(["repro", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in capfd.readouterr().err
    assert not (tmp_path / "runs").exists()


def example_connector_repro(tmp_path):
    """ExampleConnector's known defect as a repro: a 64-token prompt (2 blocks) fails on decode."""
    from pdcheck.config import EngineSpec, connector_spec, model_path
    from pdcheck.repro.case import make_repro
    from pdcheck.workload.boundary import boundary_workload

    spec = EngineSpec(model=model_path("tiny-llama"), dtype="float32", connector=connector_spec("ExampleConnector"))
    requests = [r for r in boundary_workload(spec) if len(r.prompt) == 64]
    return write(make_repro(spec, (1, 1), 0, requests, "error", "FileNotFoundError on decode"), tmp_path / "ex.json")


def test_export_writes_a_script_that_needs_no_pdcheck(tmp_path):
    from pdcheck.repro.case import export

    script = export(read(example_connector_repro(tmp_path)), tmp_path / "repro_script.py")
    text = script.read_text()
    compile(text, str(script), "exec")
    assert "import pdcheck" not in text and "from pdcheck" not in text
    assert "ExampleConnector" in text and "def make_weights" in text


def test_export_refuses_a_connector_that_needs_pdcheck(tmp_path, capfd):
    from pdcheck.config import EngineSpec, connector_spec, model_path
    from pdcheck.repro.case import make_repro

    spec = EngineSpec(model=model_path("tiny-llama"), connector=connector_spec("reference"))
    path = write(make_repro(spec, (1, 1), 0, [GenRequest("r", [5, 6], 4)], "error", ""), tmp_path / "ref.json")
    assert main(["repro", str(path), "--export", str(tmp_path / "s.py"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "not importable without pdcheck" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.vllm
def test_the_exported_script_fails_the_same_way_on_its_own(tmp_path):
    """Run the script as a user would (its own process, no pdcheck import): it reports the
    FileNotFoundError and exits 1."""
    import subprocess
    import sys

    from pdcheck.repro.case import export

    script = export(read(example_connector_repro(tmp_path)), tmp_path / "repro_script.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 1 and "REPRODUCED" in done.stdout and "FileNotFoundError" in done.stdout, done.stdout

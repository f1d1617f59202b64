"""`pdcheck run --workload`: a phase beyond the boundary workload goes through the gate as the
boundary workload does. Four prompts sharing two whole blocks, each with its own partial last
block, one after another: decode finds the shared blocks in its own prefix cache from the
second on, and must still match the oracle token for token and hold nothing after the drain.
"""

from __future__ import annotations

import json

import pytest

from pdcheck.cli import main
from pdcheck.workload.phases import SHARED

pytestmark = pytest.mark.vllm


def test_reference_connector_passes_the_shared_prefix_phase(tmp_path, capfd):
    runs = tmp_path / "runs"
    argv = ["run", "--model", "tiny-llama", "--dtype", "float32", "--connector", "reference",
            "--workload", "shared-prefix", "--runs-dir", str(runs)]
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 0 and "verdict: valid" in err, f"{err}\nreplay: pdcheck {' '.join(argv)}"
    (config,) = json.loads((runs / "latest" / "results.json").read_text())["configs"]
    sent = [(r["verdict"]["request_id"], r["verdict"]["outcome"]) for r in config["requests"]]
    assert [rid.rsplit("-len", 1)[0] for rid, _ in sent] == [f"shared-prefix-{i}" for i in range(SHARED)], sent
    assert {outcome for _, outcome in sent} == {"match"} and not config["leaks"], sent

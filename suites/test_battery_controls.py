"""The battery's negative controls: mutants run as the connector under test through `pdcheck
test`, as a connector author would run their own, each caught by the failure class it breaks.

The gate itself runs the whole battery on the reference connector (pdcheck/conformance/ is in
the test paths), so the control that must pass is there; here each mutant must make
`pdcheck test` exit 1 with the named class's test failing. ExampleConnector's recorded defects
must show as strict expected failures, with every other request passing (exit 0).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm
QUICK = pytest.param  # cases the default gate runs: one per class its own suites/ tests do not catch a mutant of
NIXL = lambda *values, **kw: pytest.param(*values, marks=pytest.mark.skipif(  # noqa: E731
    importlib.util.find_spec("nixl") is None, reason="nixl is not installed (pip install 'pdcheck[nixl]')"), **kw)
SLOW = lambda *values, **kw: pytest.param(*values, marks=pytest.mark.slow, **kw)  # noqa: E731

CASES = [
    QUICK("pdcheck.mutants.connector:CorruptOnLoad", "in_one_decode_step", "diverged", id="corrupt-on-load"),
    SLOW("pdcheck.mutants.connector:PromptKeys", "repeated and concurrent", "error", id="prompt-keys"),
    SLOW("pdcheck.mutants.connector:KeepUnpulled", "abandoned", "leak", id="keep-unpulled"),
    QUICK("pdcheck.mutants.connector:IgnoreLocalHit", "sharing_cached_blocks", "diverged", id="ignore-local-hit"),
    QUICK("pdcheck.mutants.connector:HoldAbortedPrefill", "mid-prefill", "leak", id="hold-aborted-prefill"),
    SLOW("pdcheck.mutants.connector:PullPerChild", "n2-seeded", "error", id="pull-per-child"),
    QUICK("pdcheck.mutants.connector:ServeReplays", "replayed", "diverged", id="serve-replays"),
    QUICK("pdcheck.mutants.connector:LastBlockFailed", "poison", "diverged", id="last-block-failed"),
    SLOW("pdcheck.mutants.connector:NoRedial", "prefill-restarted", "error", id="no-redial"),
    QUICK("pdcheck.mutants.connector:ReshapeToFit", "block-size", "diverged", id="reshape-to-fit"),
    SLOW("pdcheck.mutants.connector:PartialLoad", "equivalence and tiny-llama-bfloat16-len65", "partial",
         id="partial-load"),
    SLOW("pdcheck.mutants.controls:CrossedLoadsConnector", "in_one_decode_step", "diverged",
         id="example-crossed-loads"),
    NIXL("pdcheck.mutants.nixl:NixlCrossedLoads", "in_one_decode_step", "diverged", id="nixl-crossed-loads"),
    NIXL("pdcheck.mutants.nixl:NixlNoLease", "abandoned", "leak", id="nixl-no-lease"),
    SLOW("pdcheck.mutants.controls:LoadNothingConnector", "equivalence and tiny-llama-float32-len65", "fallback",
         id="load-nothing"),
    SLOW("pdcheck.mutants.connector:SkipMissingKV", "prefill-killed", "diverged", id="skip-missing-kv"),
    SLOW("pdcheck.mutants.connector:NoPullDeadline", "prefill-killed", "hang", id="no-pull-deadline"),
    SLOW("pdcheck.mutants.connector:EngineLocalKeys", "in_one_decode_step", "error", id="engine-local-keys"),
    SLOW("pdcheck.mutants.controls:NeverReleaseConnector", "in_one_decode_step", "leak", id="never-release"),
    SLOW("pdcheck.mutants.controls:PerturbBlockConnector", "equivalence and tiny-llama-float32", "diverged",
         id="perturb-block"),
]


def battery(tmp_path, connector: str, selection: str, dtype: str = "bfloat16") -> subprocess.CompletedProcess:
    """`pdcheck test` on one model and dtype, from a folder outside the repository."""
    argv = [sys.executable, "-m", "pdcheck.cli", "test", "--connector", connector, "--model", "tiny-llama",
            "--dtype", dtype, "--", "-q", "-p", "no:randomly", "-k", selection]
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("mutant, selection, outcome", CASES)
def test_mutant_under_test_is_caught_by_its_failure_class(mutant, selection, outcome, tmp_path):
    dtype = "float32" if "float32" in selection else "bfloat16"
    done = battery(tmp_path, mutant, selection, dtype)
    output = done.stdout + done.stderr
    assert done.returncode == 1, f"exit {done.returncode}, expected 1 (a failure):\n{output[-3000:]}"
    assert f": {outcome}" in output or "leak after drain" in output and outcome == "leak", output[-3000:]
    assert "replay: pdcheck test --connector " + mutant in output, output[-3000:]


def test_example_connector_shows_its_recorded_defects_as_strict_expected_failures(tmp_path):
    done = battery(tmp_path, "ExampleConnector", "equivalence", "float32")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert " xfailed" in output and "failed" not in output.replace("xfailed", ""), output[-3000:]

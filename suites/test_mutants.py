"""Known bug classes re-created as mutants (pdcheck/mutants/): the gate must catch each one.

The correct code passes the same checks elsewhere (test_layouts, test_reference_connector), or
in the same test function beside the mutant (parametrized over the correct code and the
mutant, each with its expected outcome; those correct-code cases run with --runslow, since the
reference connector passes its own suites in the default gate), so a catch is the mutant's
doing, not a broken harness. Each gate test records what it saw (`seen`, in junit properties) for `pdcheck mutants`,
and prints its replay line when it fails. The catalogue (pdcheck/mutants/catalogue.py) names
the test that catches each mutant; the last tests here keep it honest.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pdcheck.checker.compare import judge  # noqa: E402
from pdcheck.cluster.messages import GenRequest  # noqa: E402
from pdcheck.config import REFERENCE, EngineSpec, connector_spec, model_path  # noqa: E402
from pdcheck.connector.layouts import KVLayout, extract  # noqa: E402
from pdcheck.mutants.layouts import guessed_extract, slot_reshape_extract  # noqa: E402
from pdcheck.plugin import replay_line as replay  # noqa: E402
from pdcheck.types import Outcome, Rule
from pdcheck.workload.boundary import boundary_workload  # noqa: E402


def cache(layout: KVLayout, blocks: int) -> torch.Tensor:
    shape = (2, blocks, 4, 2, 8) if layout is KVLayout.FLASH_ATTN else (blocks, 2, 4, 2, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(blocks))


def test_layout_guessed_from_shape_misreads_a_two_block_flash_attention_cache(request):
    fa = cache(KVLayout.FLASH_ATTN, 2)
    assert torch.equal(guessed_extract(cache(KVLayout.FLASH_ATTN, 3), [1]), extract(cache(KVLayout.FLASH_ATTN, 3),
                                                                                   KVLayout.FLASH_ATTN, [1]))
    assert not torch.equal(guessed_extract(fa, [1]), extract(fa, KVLayout.FLASH_ATTN, [1]))
    request.node.user_properties.append(("seen", "block 1 of a 2-block FlashAttention cache read wrong"))


def test_flash_infer_read_through_a_flash_attention_slot_view_is_caught(request):
    fi = cache(KVLayout.FLASH_INFER, 3)
    assert not torch.equal(slot_reshape_extract(fi, [0, 2]), extract(fi, KVLayout.FLASH_INFER, [0, 2]))
    request.node.user_properties.append(("seen", "blocks 0 and 2 of a FlashInfer cache read wrong"))


def mutant_spec(name: str, settings: str = "{}") -> EngineSpec:
    """tiny-llama bfloat16 with the reference connector's settings and `name` from
    pdcheck.mutants.connector (or the reference connector itself, for "reference")."""
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="bfloat16", connector=connector_spec("reference", settings))
    path = REFERENCE if name == "reference" else f"pdcheck.mutants.connector:{name}"
    return dataclasses.replace(spec, connector=dataclasses.replace(spec.connector, name=path))


def seen(checked) -> str:
    """What the gate saw, request by request: `press0 diverged at token 0, press1 match, ...`."""
    parts = []
    for c in checked:
        at = f" at token {c.verdict.position}" if c.verdict.position is not None else ""
        parts.append(f"{c.verdict.request_id} {c.verdict.outcome.value}{at}")
    return ", ".join(parts)


@pytest.mark.vllm
def test_engine_local_transfer_keys_are_caught_as_errors(pd_pool, pd_history, request):
    spec = mutant_spec("EngineLocalKeys", '{"deadline_s": 2}')
    deployment, oracle = pd_pool.get(spec)
    requests = [r for r in boundary_workload(spec) if len(r.prompt) in (33, 65)]
    checked = check_requests(deployment, requests, pd_history, oracle).requests
    request.node.user_properties.append(("seen", seen(checked)))
    assert [c.verdict.outcome for c in checked] == [Outcome.ERROR, Outcome.ERROR], [c.verdict for c in checked]


@pytest.mark.slow  # the default gate catches SkipMissingKV in test_buffer_pressure.py and test_nemesis.py
@pytest.mark.vllm
def test_missing_kv_skipped_silently_is_caught_as_divergence(pd_run_dir, request):
    """Prefill dies before decode pulls: the reference fails the request; this mutant decodes
    on blocks that were never loaded, and the oracle comparison shows it."""
    from pdcheck.client.legs import decode_request, prefill_request
    from pdcheck.cluster.deployment import Deployment

    spec = mutant_spec("SkipMissingKV", '{"deadline_s": 2}')
    probe = next(r for r in boundary_workload(spec) if len(r.prompt) == 97)
    with Deployment(spec, pd_run_dir, "skip-missing") as deployment:
        prefill, decode = deployment.pair(0)
        expected = deployment.oracle.generate([probe], 30)[0]
        prefilled = prefill.generate([prefill_request(probe, spec.connector, decode)], 30)[0]
        prefill.process.kill()
        decoded = decode.generate([decode_request(probe, prefilled, spec.connector)], 30)[0]
    verdict = judge(expected, decoded, Rule.STRICT, 0.0, decoded.num_cached_tokens, expected_external=1)
    at = f" at token {verdict.position}" if verdict.position is not None else ""
    request.node.user_properties.append(("seen", f"{verdict.request_id} {verdict.outcome.value}{at} (prefill killed)"))
    assert verdict.outcome is Outcome.DIVERGED, verdict


@pytest.mark.vllm
@pytest.mark.parametrize("variant", [pytest.param("reference", marks=pytest.mark.slow), "CorruptOnLoad"])
def test_kv_damaged_on_its_way_into_decode_is_caught_as_divergence(variant, pd_pool, pd_history, request):
    spec = mutant_spec(variant)
    deployment, oracle = pd_pool.get(spec)
    requests = [r for r in boundary_workload(spec) if len(r.prompt) in (65, 97)]
    checked = check_requests(deployment, requests, pd_history, oracle).requests
    request.node.user_properties.append(("seen", seen(checked)))
    expected = Outcome.MATCH if variant == "reference" else Outcome.DIVERGED
    assert [c.verdict.outcome for c in checked] == [expected] * len(requests), f"{seen(checked)}\n{replay(request)}"


def check_requests(deployment, requests, history, oracle, concurrency: int = 1, **options):
    from pdcheck.gate import run_config

    return run_config(deployment, requests, history, oracle=oracle, concurrency=concurrency, **options)


# A pool of 5 blocks (vLLM keeps one back) holds one 80-token prompt and a 128-token model
# length: the other requests of a concurrent batch wait for the blocks the one before frees, and
# write their KV into them at once. The prompts are distinct: identical prompts would write the
# same bytes into a reused block, so a late read could not tell.
POOL_BLOCKS, POOL_MODEL_LEN, PRESSURE_REQUESTS, PRESSURE_LEN, PRESSURE_TOKENS = 5, 128, 6, 80, 8
LATE_READ_MUTANTS = ("DeferredExtraction", "FreeBeforeSend")


def pressure_requests(seed: int = 7, vocab_size: int = 512) -> list[GenRequest]:
    rng = random.Random(seed)
    return [GenRequest(f"press{i}-len{PRESSURE_LEN}", [rng.randrange(4, vocab_size) for _ in range(PRESSURE_LEN)],
                       PRESSURE_TOKENS) for i in range(PRESSURE_REQUESTS)]


@pytest.mark.vllm
@pytest.mark.parametrize("variant", [pytest.param("reference", marks=pytest.mark.slow),
                                     pytest.param("LiveRead", marks=pytest.mark.slow), *LATE_READ_MUTANTS])
def test_send_reading_blocks_freed_before_it_is_caught_as_divergence(variant, pd_pool, pd_history, request):
    """vLLM #22965 (send thread extracting late) and #21570 (blocks freed before the send): the
    send reads blocks that requests scheduled after it have overwritten. The reference copies at
    save time; LiveRead reads late but holds the blocks until sent: both must match, with the
    whole prompt but its last token loaded, and free everything after. Each mutant must diverge
    at the first request (the next one reuses its blocks at once) and match at the last (nothing
    reuses its blocks), and never error or hang."""
    spec = dataclasses.replace(mutant_spec(variant, '{"mode": "put_async"}'), num_blocks=POOL_BLOCKS,
                               max_model_len=POOL_MODEL_LEN)
    deployment, oracle = pd_pool.get(spec)
    requests = pressure_requests()
    result = check_requests(deployment, requests, pd_history, oracle, concurrency=len(requests))
    checked = result.requests
    request.node.user_properties.append(("seen", seen(checked)))
    outcomes = [c.verdict.outcome for c in checked]
    if variant in LATE_READ_MUTANTS:
        reuse_shows = outcomes[0] is Outcome.DIVERGED and outcomes[-1] is Outcome.MATCH
        assert reuse_shows and set(outcomes) <= {Outcome.DIVERGED, Outcome.MATCH}, (
            f"{variant} escaped: {seen(checked)}\n{replay(request)}")
        return
    assert outcomes == [Outcome.MATCH] * len(requests), f"{seen(checked)}\n{replay(request)}"
    assert [c.external_tokens for c in checked] == [PRESSURE_LEN - 1] * len(requests), replay(request)
    assert result.leaks == (), replay(request)


# The gate's deadline per leg and the instance's reply grace, lowered so that a hang is judged in
# seconds; a hung worker is then asked to stop and killed after the instance's 10 s join.
GATE_DEADLINE_S, REPLY_GRACE_S, STOP_S = 4.0, 2.0, 10.0


@pytest.mark.slow  # unbounded waits: the default gate has NoPullDeadline (process faults) and NoReplyDeadline
@pytest.mark.vllm
@pytest.mark.parametrize("variant", ["DropFirstPush", "NoReceiveDeadline"])
def test_receive_without_a_deadline_is_caught_as_a_hang(variant, pd_pool, pd_history, request, monkeypatch):
    """A lost push (prefill's first): the reference's receive deadline (1 s) fails the load, the
    request ends as an error and the next one matches. Without a deadline decode's engine step
    never returns: the gate must end the request as a hang within its own deadline."""
    from pdcheck.cluster import instance

    monkeypatch.setattr(instance, "REPLY_GRACE_S", REPLY_GRACE_S)
    spec = mutant_spec(variant, '{"mode": "put", "deadline_s": 1}')
    deployment, oracle = pd_pool.get(spec)
    requests = [r for r in boundary_workload(spec) if len(r.prompt) in (65, 97)]
    oracle.results(requests)  # before the clock starts
    started, judged_at = time.monotonic(), []
    checked = check_requests(deployment, requests, pd_history, oracle, deadline_s=GATE_DEADLINE_S,
                             on_result=lambda _: judged_at.append(time.monotonic())).requests
    elapsed = judged_at[-1] - started  # to the last verdict: the drain after it restarts what was stopped
    request.node.user_properties.append(("seen", f"{seen(checked)} in {elapsed:.1f}s"))
    outcomes = [c.verdict.outcome for c in checked]
    if variant == "NoReceiveDeadline":
        # the hung decode instance was stopped: the next request finds it gone
        assert outcomes == [Outcome.HANG, Outcome.ERROR], f"{seen(checked)}\n{replay(request)}"
        limit = 2 * (GATE_DEADLINE_S + REPLY_GRACE_S) + STOP_S + 5
    else:
        assert outcomes == [Outcome.ERROR, Outcome.MATCH], f"{seen(checked)}\n{replay(request)}"
        limit = 2 * GATE_DEADLINE_S
    assert elapsed < limit, f"{seen(checked)}: took {elapsed:.1f}s, allowed {limit:.0f}s\n{replay(request)}"


# -- the catalogue (pdcheck/mutants/catalogue.py) and `pdcheck mutants` ---------------------------

ROOT = Path(__file__).resolve().parents[1]
BUG_CLASSES = {  # BUGS.md rows the catalogue must cover: the new mutants' and the existing ones'
    "repeated identical prompts give garbage", "blocks freed before send completes", "unbounded waits",
    "transfer keys differ across instances", "missing KV skipped silently", "garbled output, CUDA streams",
    "layout misread", "harness rot", "silent fallback", "leaks on abort", "uneven polling", "stale instances",
    "MoE chunk remainder", "send before the layer's KV is written", "n > 1 through PD",
}


def defined_names(path: Path) -> set[str]:
    """Top-level classes, functions and assignments of a module, read without importing it."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_catalogue_covers_every_bug_class_and_every_mutant():
    from pdcheck.mutants.catalogue import CATALOGUE, NOT_MUTANTS

    assert BUG_CLASSES <= {e.bug_class for e in CATALOGUE}, BUG_CLASSES - {e.bug_class for e in CATALOGUE}
    assert len({e.name for e in CATALOGUE}) == len(CATALOGUE), "catalogue names must be unique"
    listed = {e.mutant for e in CATALOGUE}
    folder = ROOT / "pdcheck" / "mutants"
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("__init__", "catalogue"):
            continue
        module = f"pdcheck.mutants.{path.stem}"
        missing = {n for n in defined_names(path) - NOT_MUTANTS if not n.startswith("_")} - {
            m.partition(":")[2] for m in listed if m.startswith(f"{module}:")}
        assert not missing, f"{module} defines {sorted(missing)} with no catalogue entry (or list them in NOT_MUTANTS)"
    for entry in CATALOGUE:
        module, _, attribute = entry.mutant.partition(":")
        path = folder / f"{module.rpartition('.')[2]}.py"
        assert module.startswith("pdcheck.mutants.") and (not path.exists() or attribute in defined_names(path)), (
            f"{entry.name}: {entry.mutant} is not defined")


def test_every_cpu_catalogue_entry_names_a_test_node_that_exists(tmp_path):
    from pdcheck.mutants.catalogue import CATALOGUE, Tier

    nodes = [e.test for e in CATALOGUE if e.tier is Tier.CPU and e.is_present]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
               f"--basetemp={tmp_path / 'collect'}", *nodes]
    collected = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    found = set(collected.stdout.splitlines())
    assert [n for n in nodes if n not in found] == [], collected.stdout[-3000:]


def test_pdcheck_mutants_runs_one_entry_and_reports_it_caught(tmp_path, capsys):
    import msgspec

    from pdcheck.cli import main

    assert main(["mutants", "--only", "ReinsertOnHeartbeat", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    [row] = msgspec.json.decode((tmp_path / "runs" / "latest" / "results.json").read_bytes())["rows"]
    assert row["status"] == "caught" and row["seconds"] > 0, row
    table_row = next(line for line in out.splitlines() if "ReinsertOnHeartbeat" in line)
    assert "│ yes" in table_row and "test_reinsert_on_heartbeat_mutant_is_caught" in out, out


def test_mutants_table_shows_node_ids_with_brackets_as_written():
    from io import StringIO

    from rich.console import Console

    from pdcheck.bench.mutants import Row, print_table

    console = Console(file=StringIO(), width=400)
    print_table(console, [Row("m", "harness rot", "", "CPU", "caught", "t.py::test_x[block]", "passed", 1.0, "r")])
    assert "t.py::test_x[block]" in console.file.getvalue()


def test_a_catching_test_that_fails_or_does_not_run_counts_as_a_survivor(tmp_path):
    """Caught means the node ran and passed; a failure (the mutant slipped through), an error, a
    skip, a missing node or a timeout is a survivor, and says what the test saw."""
    from pdcheck.bench.mutants import run_entry, verdict
    from pdcheck.mutants.catalogue import Entry

    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase name="t"><properties><property name="seen" '
                     'value="press0 match, press1 match"/></properties><failure message="AssertionError: '
                     'FreeBeforeSend escaped"/></testcase></testsuite></testsuites>')
    assert verdict(junit, 1, 600) == (False, "failure: AssertionError: FreeBeforeSend escaped "
                                             "(saw: press0 match, press1 match)")
    junit.write_text('<testsuites><testsuite><testcase name="t"><skipped message="needs vLLM"/></testcase>'
                     '</testsuite></testsuites>')
    assert verdict(junit, 0, 600) == (False, "skipped: needs vLLM")
    assert verdict(tmp_path / "none.xml", None, 600) == (False, "timed out after 600s")
    ghost = Entry("ghost", "harness rot", "", "a catching test that is not there", "pdcheck.mutants.proxy:Ghost",
                  "suites/test_uneven_polling.py::test_that_does_not_exist")
    row = run_entry(ghost, tmp_path / "runs", has_gpu=False, timeout_s=120)
    assert row.status == "survived" and row.seen.startswith("0 tests ran"), row

"""`pdcheck mutants`: run each catalogue entry's catching test, and time how long it takes.

Each entry's test runs alone in `python -m pytest <node id> -p no:cacheprovider -q`, a fresh
process in its own process group (killed if it outlives --timeout-s or pdcheck), from the project
root, with its own folder in the run folder: `<runs>/<timestamp>-<pid>/<name>/` holds
pytest.log, junit.xml and pytest's basetemp (the engines' logs). The time to detect is that
process's wall time, from start to verdict, imports and engine starts included.

Caught means the node ran and passed: it asserts the mutant's failure. Anything else is a
survivor: the test failed (the mutant slipped through), errored, was skipped, did not run, or
timed out. Either way the row says what the test saw (its recorded `seen` property, else its
failure, error or skip line). GPU entries run only where CUDA is, else are listed as "GPU tier";
entries whose mutant module is absent are listed as such. The table is printed and written,
with every field, to results.json; history.jsonl records each run as it goes.
Exit 1 if any mutant that ran survived, 0 otherwise.
"""

from __future__ import annotations

import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pdcheck.history import Completion, Fail, Info, Invoke, Ok
from pdcheck.mutants.catalogue import Entry, Tier, by_name
from pdcheck.store import RunStore

ROOT = Path(__file__).resolve().parents[2]  # the project root: the catalogue's node ids are relative to it
TARGET_MEDIAN_S, TARGET_WORST_S = 30.0, 120.0
MUTANTS = "mutants"  # the history's configuration for every entry's run


class Row(msgspec.Struct):
    name: str
    bug_class: str
    issues: str
    tier: str
    status: str  # caught | survived | GPU tier | absent
    test: str
    seen: str  # what the test saw
    seconds: float | None
    reproducer: str

    @property
    def ran(self) -> bool:
        return self.status in ("caught", "survived")


def reproducer(entry: Entry) -> str:
    return f"python -m pytest {shlex.quote(entry.test)} -p no:cacheprovider -q --runslow"


def pytest_command(entry: Entry, folder: Path) -> list[str]:
    # --runslow: a catching test the default gate leaves to the slow tier still runs here
    return [sys.executable, "-m", "pytest", entry.test, "-p", "no:cacheprovider", "-q", "--runslow",
            f"--basetemp={folder / 'pytest'}", f"--junitxml={folder / 'junit.xml'}", "-o", "junit_family=legacy"]


def run_test(entry: Entry, folder: Path, timeout_s: float) -> tuple[int | None, float]:
    """(pytest's exit code, or None if it timed out; wall seconds)."""
    folder.mkdir(parents=True)
    started = time.monotonic()
    with (folder / "pytest.log").open("wb") as log:
        process = subprocess.Popen(pytest_command(entry, folder), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return code, time.monotonic() - started


def verdict(junit: Path, code: int | None, timeout_s: float) -> tuple[bool, str]:
    """(caught, what the test saw) from the junit report and pytest's exit code."""
    if code is None:
        return False, f"timed out after {timeout_s:.0f}s"
    cases = list(ET.parse(junit).iter("testcase")) if junit.exists() else []
    if len(cases) != 1:
        return False, f"{len(cases)} tests ran, expected 1 (pytest exit {code})"
    case = cases[0]
    seen = next((p.get("value", "") for p in case.iter("property") if p.get("name") == "seen"), "")
    for tag in ("failure", "error", "skipped"):
        found = case.find(tag)
        if found is not None:
            message = (found.get("message") or found.text or "").strip().splitlines()
            line = message[0] if message else ""
            return False, f"{tag}: {line}" + (f" (saw: {seen})" if seen and seen not in line else "")
    if code != 0:
        return False, f"pytest exit {code}" + (f" (saw: {seen})" if seen else "")
    return True, seen or "passed"


def completion(row: Row) -> Completion:
    """Caught: ok; survived: fail, or info where it timed out (cut off, outcome unknown); not
    run (absent, GPU tier): info. `detail` says the status and what the test saw."""
    if row.status == "caught":
        kind = Ok
    elif row.status == "survived" and not row.seen.startswith("timed out"):
        kind = Fail
    else:
        kind = Info
    return kind(config=MUTANTS, request_id=row.name, detail=f"{row.status}: {row.seen}", seconds=row.seconds)


def run_entry(entry: Entry, folder: Path, has_gpu: bool, timeout_s: float) -> Row:
    row = Row(entry.name, entry.bug_class, entry.issues, entry.tier.value, "", entry.test, "", None, reproducer(entry))
    if not entry.is_present:
        row.status, row.seen = "absent", f"{entry.module} does not exist here"
    elif entry.tier is Tier.GPU and not has_gpu:
        row.status, row.seen = "GPU tier", "not run: no CUDA GPU"
    else:
        code, row.seconds = run_test(entry, folder / entry.name, timeout_s)
        caught, row.seen = verdict(folder / entry.name / "junit.xml", code, timeout_s)
        row.status = "caught" if caught else "survived"
    return row


def cuda_present() -> bool:
    from pdcheck.plugin import cuda_device_count

    return cuda_device_count() > 0


def print_table(console: Console, rows: list[Row]) -> None:
    table = Table(title="pdcheck mutants: the known-bug catalogue")
    for column in ("mutant", "bug class", "caught", "first failing test / outcome seen", "detect s", "reproducer"):
        table.add_column(column, justify="right" if column == "detect s" else "left", overflow="fold")
    for row in rows:
        caught = {"caught": "yes", "survived": "NO"}.get(row.status, row.status)
        shown = f"{row.test}\n{row.seen}" if row.status == "caught" else row.seen
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        cells = (row.name, f"{row.bug_class} ({row.issues})" if row.issues else row.bug_class, caught, shown,
                 seconds, row.reproducer if row.ran else "")
        table.add_row(*(Text(cell) for cell in cells))  # node ids hold brackets rich would read as markup
    console.print(table)


def timing_summary(rows: list[Row]) -> dict:
    ran = [r for r in rows if r.ran]
    if not ran:
        return {}
    worst = max(ran, key=lambda r: r.seconds)
    return {"median_s": statistics.median(r.seconds for r in ran), "worst_s": worst.seconds, "worst": worst.name,
            "target_median_s": TARGET_MEDIAN_S, "target_worst_s": TARGET_WORST_S}


def bench_mutants(args, stack: ExitStack, console: Console) -> int:
    entries = by_name(args.only)
    store = RunStore(args.runs_dir.resolve())
    stack.callback(store.close)
    has_gpu = any(e.tier is Tier.GPU for e in entries) and cuda_present()
    rows = []
    for entry in entries:
        store.history.record(Invoke(config=MUTANTS, request_id=entry.name, detail=entry.test))
        row = run_entry(entry, store.folder, has_gpu, args.timeout_s)
        store.history.record(completion(row))
        rows.append(row)
        console.print(f"{entry.name}: {row.status} {'' if row.seconds is None else f'in {row.seconds:.1f}s'}",
                      markup=False, highlight=False)
    # not a terminal: as wide as the table needs, so no node id is folded (they are copied and grepped)
    out = Console(width=None if sys.stdout.isatty() else 1000)
    print_table(out, rows)
    summary = timing_summary(rows)
    if summary:
        out.print(f"time to detect over {sum(r.ran for r in rows)} mutants run: median {summary['median_s']:.1f}s "
                  f"(target <= {TARGET_MEDIAN_S:.0f}s), worst {summary['worst_s']:.1f}s ({summary['worst']}; "
                  f"target <= {TARGET_WORST_S:.0f}s)", markup=False, highlight=False)
    survivors = [r for r in rows if r.status == "survived"]
    for row in survivors:
        out.print(f"survived: {row.name}: {row.seen}\n  replay: {row.reproducer}", markup=False, highlight=False)
    out.print(f"run folder: {store.folder}", markup=False, highlight=False)
    store.write_results({"rows": rows, "timing": summary, "survived": [r.name for r in survivors]})
    return 1 if survivors else 0

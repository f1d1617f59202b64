"""report.html from a run folder written by the real code: `gate.check` over a fake 1P1D
deployment with a nemesis pausing a real (sleeping) process, and the black-box runner's
verdicts, hooks and finish. The page is parsed with html.parser: a bar per request in its lane,
fault windows with their history times, failures marked with their first differing token,
counts equal to results.json, a leak taken from results.json (the history holds one completion
per request), and nothing fetched from the network.
"""

from __future__ import annotations

import io
import subprocess
import time
from collections import Counter
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from rich.console import Console

from pdcheck.blackbox import runner as blackbox
from pdcheck.faults.hooks import Hook, Hooks
from pdcheck.gate import Expect, run_config
from pdcheck.history import Completion, Fault, Invoke, read_history
from pdcheck.profiles import Profile
from pdcheck.report.html import write_report
from pdcheck.store import RunStore, read_results
from pdcheck.types import Calibration, ConfigResult, EngineState, GenRequest, GenResult, PDResult, Planned, Rule, RunResults

CONFIG = "tiny-llama/bfloat16"
PAIR = f"{CONFIG} · prefill0 → decode0"
EXPECTED = list(range(100, 116))
STRICT = Calibration(Rule.STRICT, 0.0, 0.0, "oracle bitwise stable across batch compositions")
VOID = {"meta", "br", "link", "img", "input", "hr"}


class Elements(HTMLParser):
    """Every element: its tag, attributes, text inside it, and the ids of the elements around it."""

    def __init__(self, text: str):
        super().__init__()
        self.found, self.open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": "",
                   "within": [o["id"] for o in self.open if "id" in o]}
        self.found.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data

    def having(self, css_class: str, **attrs) -> list[dict]:
        return [e for e in self.found if css_class in e.get("class", "").split()
                and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def result(rid: str, tokens: list[int], error: str | None = None) -> GenResult:
    return GenResult(rid, tokens, [-0.5] * len(tokens), [{t: -0.5} for t in tokens], error=error)


class FakeDeployment:
    """1P1D as gate.run_config drives it, its own client; each request's PD output scripted, decode's
    process real."""

    def __init__(self, outputs: dict[str, PDResult], process, held: tuple[str, ...] = ()):
        connector = SimpleNamespace(profile=Profile(), lineage=())
        self.spec = SimpleNamespace(label=CONFIG, block_size=32, connector=connector)
        self.outputs, self.topology = outputs, "1P1D"
        self.instances = [SimpleNamespace(name=name, process=process,
                                          drain=lambda _, usage=usage, held=held: EngineState(usage, 0, 0, held))
                          for name, usage, held in (("prefill0", 0.0, ()), ("decode0", 0.01, held))]

    def client(self):
        return self

    def revive(self):
        pass

    def pair(self, i):
        return tuple(self.instances)

    def send(self, requests, batch, deadline_s, between=None):
        if between:
            between()
        time.sleep(0.25 if batch == 1 else 0.02)  # batch 1's decode pause heals mid-batch
        return [self.outputs[r.request_id] for r in requests]

    def transfers(self):
        return {}


@pytest.fixture
def gate_run(tmp_path):
    """Four requests: a match, an error under a decode pause (allowed), a fallback, a divergence at
    token 5; decode0 still holds KV after the drain."""
    requests = [GenRequest(f"r-len{n}", list(range(n)), 16) for n in (31, 32, 33, 65)]
    diverged = EXPECTED[:5] + [7, 7] + EXPECTED[7:]
    outputs = {"r-len31": PDResult(result("r-len31", EXPECTED), 0, GenResult("r-len31")),
               "r-len32": PDResult(result("r-len32", [], "finish_reason=error"), 0, GenResult("r-len32")),
               "r-len33": PDResult(result("r-len33", EXPECTED), 0, GenResult("r-len33")),
               "r-len65": PDResult(result("r-len65", diverged), 64, GenResult("r-len65"))}
    oracle = SimpleNamespace(calibration=STRICT, results=lambda rs: [result(r.request_id, EXPECTED) for r in rs])
    store = RunStore(tmp_path / "runs")
    process = subprocess.Popen(["sleep", "60"])
    try:
        deployment = FakeDeployment(outputs, process)
        faults = [Planned(batch=1, target="decode", seconds=0.1)]
        config = run_config(deployment, requests, store.history, oracle=oracle, faults=faults)
    finally:
        process.kill()
        process.wait()
    store.write_results(RunResults("invalid", (config,)))
    (store.folder / "repro-65-tiny-llama-bfloat16.json").write_text("{}")  # as pdcheck run names it
    store.close()
    return store.folder


def test_every_request_is_a_bar_in_its_pairs_lane_from_invoke_to_outcome(gate_run):
    page = Elements(write_report(gate_run).read_text())
    history = read_history(gate_run / "history.jsonl")
    invokes = [op for op in history if isinstance(op, Invoke)]
    outcomes = [op for op in history if isinstance(op, Completion)]
    bars = page.having("bar")
    assert [b["data-request"] for b in bars] == [op.request_id for op in invokes]
    assert {b["data-lane"] for b in bars} == {PAIR}
    assert [float(b["data-start"]) for b in bars] == [op.time for op in invokes]
    assert [float(b["data-end"]) for b in bars] == [op.time for op in outcomes]
    assert [b["data-outcome"] for b in bars] == ["match", "error", "fallback", "diverged"]
    assert [label["text"] for label in page.having("lane")] == [PAIR]


def test_the_decode_pause_is_shaded_from_inject_to_heal(gate_run):
    page = Elements(write_report(gate_run).read_text())
    faults = [op for op in read_history(gate_run / "history.jsonl") if isinstance(op, Fault) and op.fault == "pause"]
    assert [f.phase for f in faults] == ["inject", "heal"]
    (window,) = page.having("fault")
    assert window["data-name"] == "pause decode0 (batch 1)" and "pause decode0 (batch 1)" in window["text"]
    assert (float(window["data-start"]), float(window["data-end"])) == (faults[0].time, faults[1].time)


def test_failures_are_marked_and_the_divergence_shows_its_first_differing_token(gate_run):
    page = Elements(write_report(gate_run).read_text())
    failed = {b["data-request"]: b for b in page.having("bar", data_failed="1")}
    assert sorted(failed) == ["r-len33", "r-len65"]  # the faulted error passes; the fallback does not
    assert all("failed" in b["class"].split() for b in failed.values())
    listed = [a for a in page.found
              if a["tag"] == "a" and a.get("href") == failed["r-len65"]["href"] and "class" not in a]
    assert "r-len65: diverged" in listed[0]["text"]  # listed under Failures too
    section = failed["r-len65"]["href"][1:]
    cells = [e for e in page.having("first-diff") if section in e["within"] and e["tag"] == "td"]
    assert {c["data-side"]: (c["data-position"], c["text"]) for c in cells} == {"expected": ("5", "105"),
                                                                              "got": ("5", "7")}
    text = next(e["text"] for e in page.found if e.get("id") == section)
    assert "reproduce: pdcheck repro" in text and "repro-65-tiny-llama-bfloat16.json" in text


def test_counts_per_outcome_and_the_leak_equal_results_json(gate_run):
    page = Elements(write_report(gate_run).read_text())
    results = read_results(gate_run)
    (cfg,) = results.configs
    counts = {c["data-outcome"]: int(c["text"]) for c in page.found if c.get("data-outcome") and c["tag"] == "td"}
    expected = Counter(c.counted for c in cfg.requests)
    assert set(expected) <= set(counts) and counts == {name: expected[name] for name in counts}
    assert counts["match"] == counts["error"] == counts["fallback"] == counts["diverged"] == 1
    (drained,) = page.having("drained")
    assert drained["text"] == "leak" and drained["data-leaks"] == str(len(cfg.leaks)) == "1"
    assert next(e for e in page.found if e.get("id") == "verdict")["text"] == results.verdict == "invalid"


def test_a_request_held_after_the_drain_is_a_leak_from_results_json_with_one_completion(tmp_path):
    """decode0 still holds r-len33 after the drain: its bar, its count and its failure line say
    leak, taken from results.json; the history completes it once."""
    requests = [GenRequest(f"r-len{n}", list(range(n)), 16) for n in (31, 33)]
    outputs = {r.request_id: PDResult(result(r.request_id, EXPECTED), 32 * (len(r.prompt) > 32),
                                      GenResult(r.request_id)) for r in requests}
    oracle = SimpleNamespace(calibration=STRICT, results=lambda rs: [result(r.request_id, EXPECTED) for r in rs])
    store = RunStore(tmp_path / "runs")
    deployment = FakeDeployment(outputs, None, held=("r-len33",))
    store.write_results(RunResults("invalid", (run_config(deployment, requests, store.history, oracle=oracle),)))
    store.close()
    completed = [op.request_id for op in read_history(store.folder / "history.jsonl") if isinstance(op, Completion)]
    assert completed == ["r-len31", "r-len33"]
    assert [c.leak for c in read_results(store.folder).configs[0].requests] == [
        None, "decode0 still holds it after the drain"]
    page = Elements(write_report(store.folder).read_text())
    assert [(b["data-request"], b["data-outcome"], b["data-failed"]) for b in page.having("bar")] == [
        ("r-len31", "match", "0"), ("r-len33", "leak", "1")]
    (cell,) = [c for c in page.found if c.get("data-outcome") == "leak" and c["tag"] == "td"]
    assert cell["text"] == "1"
    assert any("r-len33: leak" in e["text"] and e["tag"] == "li" for e in page.found)


def test_a_partial_load_is_counted_colored_and_failed(tmp_path):
    """A request that matched but loaded 32 of the 64 prompt tokens expected is `partial`: its own
    summary column, its own bar color, and a failure."""
    requests = [GenRequest("r-len65", list(range(65)), 16)]
    outputs = {"r-len65": PDResult(result("r-len65", EXPECTED), 32, GenResult("r-len65"))}
    oracle = SimpleNamespace(calibration=STRICT, results=lambda rs: [result(r.request_id, EXPECTED) for r in rs])
    store = RunStore(tmp_path / "runs")
    store.write_results(RunResults("invalid", (run_config(FakeDeployment(outputs, None), requests, store.history,
                                                          oracle=oracle),)))
    store.close()
    text = write_report(store.folder).read_text()
    page = Elements(text)
    (bar,) = page.having("bar")
    assert (bar["data-outcome"], bar["data-failed"]) == ("partial", "1") and "o-partial" in bar["class"].split()
    (cell,) = [c for c in page.found if c.get("data-outcome") == "partial" and c["tag"] == "td"]
    assert cell["text"] == "1" and ".o-partial{" in text


def test_the_page_fetches_nothing(gate_run):
    text = write_report(gate_run).read_text()
    page = Elements(text)
    links = [e.get(a, "") for e in page.found for a in ("src", "href") if a in e]
    assert links and not [link for link in links if "//" in link or link.startswith(("http:", "https:"))]
    fetching = ("script", "link", "img", "iframe")
    assert not [e for e in page.found if e["tag"] in fetching and ("src" in e or "href" in e)]
    assert "url(" not in text and "@import" not in text


class ScriptedEndpoint:
    """The target as black-box mode sends to it: the scripted answers, in the order asked."""

    def __init__(self, answers: list[GenResult]):
        self.answers = answers

    def generate(self, requests, deadline_s, stream=False):
        return [self.answers.pop(0) for _ in requests]


def test_a_black_box_run_gets_a_lane_per_phase_and_its_hook_window(tmp_path):
    """Hook to heal is a window; client faults are points; two requests under one id are two bars."""
    store = RunStore(tmp_path / "runs")
    history = store.history
    hooks = Hooks([Hook(1, "true", False), Hook(2, "true", True)], history)
    oracle = SimpleNamespace(calibration=STRICT, results=lambda rs: [result(r.request_id, EXPECTED) for r in rs])
    expect = Expect(32, follow_ties=False)
    boundary = [GenRequest(rid, [1] * 31, 16) for rid in ("r-len31", "r-len32", "r-len33")]
    remote = blackbox.RemoteTarget(ScriptedEndpoint([result(r.request_id, EXPECTED) for r in boundary]), None, hooks)
    configs = [run_config(remote, boundary, history, oracle=oracle, client=remote.client(), config="boundary",
                          expect=expect)]
    history.record(Fault(config="boundary", fault="abort-mid-stream", request_id="abort-mid-stream-len31",
                         detail="closed the stream after 2 chunks"))
    twins = [GenRequest("duplicate-id", [1] * 31, 16)] * 2
    target = ScriptedEndpoint([result("duplicate-id", EXPECTED), result("duplicate-id", [9] * 16)])
    checked = blackbox.sent_at_once(target, oracle, twins, history, expect)
    configs.append(ConfigResult("client-faults", STRICT, tuple(checked), drained="unknown"))
    out = io.StringIO()
    assert blackbox.finish(store, Console(file=out, width=200), configs, []) == 1
    store.close()
    report = store.folder / "report.html"
    assert f"report: {report}" in out.getvalue().splitlines()
    page = Elements(report.read_text())
    bars = page.having("bar")
    assert [(b["data-lane"], b["data-request"]) for b in bars] == [
        ("boundary", "r-len31"), ("boundary", "r-len32"), ("boundary", "r-len33"),
        ("client-faults", "duplicate-id"), ("client-faults", "duplicate-id")]
    assert [b["data-failed"] for b in bars] == ["0", "0", "0", "0", "1"]
    faults = {(op.fault, op.phase): op.time for op in read_history(store.folder / "history.jsonl")
              if isinstance(op, Fault)}
    hook, point = page.having("fault")
    assert (hook["data-name"], float(hook["data-start"]), float(hook["data-end"])) == (
        "hook: true", faults["hook", "inject"], faults["hook", "heal"])
    assert "point" in point["class"] and float(point["data-start"]) == faults["abort-mid-stream", "act"]
    assert page.having("drained", data_config="client-faults")[0]["text"] == "unknown"

"""report.html: one run folder's history and results as a single self-contained page.

`write_report(folder)` reads history.jsonl and results.json and writes folder/report.html:
- the verdict, and per configuration the counts per outcome (counted as the terminal summary
  counts them, `known` included) and the drain (clean, leak or unknown), then every failure;
- a timeline: each request a bar from its invoke line to its outcome line, colored by outcome,
  failures outlined and marked, in one lane per prefill -> decode pair where the invoke line
  names it (`prefill`, `decode` fields; a 1P1D deployment has one pair), else one lane per
  configuration; fault windows (a nemesis pause from inject to heal, a black-box hook to its
  heal) shaded across all lanes with their name, point faults (client faults) as lines;
- per request, shown when its bar is clicked: what was recorded, expected vs got tokens with the
  first differing position highlighted, and `pdcheck repro <file>` where the run wrote one.

Both files are read through their typed readers (`read_history`, `read_results`). A request's
outcome and its leak (an instance still held it after the drain) come from results.json; the
history gives its times, lane and tokens.

The history keeps both whole token lists (the gate's outcome lines carry `tokens` and
`expected`); for a history without `expected`, the row shows the results' window of the
oracle's tokens around the first difference.

Standard library only: one fixed page filled by a few small functions, with html.escape on every
value; a template engine would not make it shorter, and jinja2 is installed only as a vLLM
dependency, not one of pdcheck's. Nothing is fetched: the CSS is inline and a request's details
open through the CSS :target selector, so the page needs no script.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from html import escape
from pathlib import Path

import msgspec

from pdcheck.checker.compare import WINDOW
from pdcheck.history import Completion, Fault, Invoke, Operation, read_history
from pdcheck.known_defects import KNOWN_DEFECTS
from pdcheck.report.terminal import COLUMNS, column, failure_line
from pdcheck.store import read_results
from pdcheck.types import Checked, RunResults

ROW_PX = 16


@dataclass
class Bar:
    index: int
    lane: str
    invoke: Invoke
    start: float
    end: float
    done: Completion | None = None  # the ok / fail / info op; None if the history ends first
    checked: Checked | None = None  # its entry in results.json
    row: int = 0  # overlapping bars in one lane stack in rows

    @property
    def outcome(self) -> str:
        if self.checked:
            return column(self.checked)
        if self.done and self.done.verdict:
            return self.done.verdict.outcome.value
        return "unfinished"

    @property
    def is_failed(self) -> bool:
        return self.checked is not None and not self.checked.passed


@dataclass
class Window:
    name: str
    start: float
    end: float
    healed: bool = True


def write_report(folder: Path) -> Path:
    folder = Path(folder)
    history = read_history(folder / "history.jsonl")
    results = read_results(folder)
    end = max((op.time for op in history), default=0.0)
    bars = make_bars(history, results, end)
    body = [summary(results), failures(bars, folder), timeline(bars, fault_windows(history, end)),
            *(details(bar, folder) for bar in bars)]
    path = folder / "report.html"
    path.write_text(PAGE.format(title=escape(f"pdcheck {folder.name}: {results.verdict}"), style=STYLE,
                                body="\n".join(body)), encoding="utf-8")
    return path


def lane(invoke: Invoke) -> str:
    if invoke.prefill and invoke.decode:
        return f"{invoke.config} · {invoke.prefill} → {invoke.decode}"
    if invoke.topology == "1P1D":
        return f"{invoke.config} · prefill0 → decode0"
    return invoke.config


def make_bars(history: list[Operation], results: RunResults, end: float) -> list[Bar]:
    """A bar per invoke, closed by the next completion of the same configuration and id (ids can
    repeat: the black-box run sends two requests under one id); the k-th completion of a
    configuration is its k-th entry in results.json, both being written in judging order."""
    judged = {cfg.config: iter(cfg.requests) for cfg in results.configs}
    waiting: dict[tuple, list[Bar]] = defaultdict(list)
    bars = []
    for op in history:
        if isinstance(op, Invoke):
            bar = Bar(len(bars), lane(op), op, op.time, end)
            bars.append(bar)
            waiting[op.config, op.request_id].append(bar)
        elif isinstance(op, Completion) and waiting.get((op.config, op.request_id)):
            bar = waiting[op.config, op.request_id].pop(0)
            bar.done, bar.end = op, op.time
            bar.checked = next(judged.get(op.config, iter(())), None)
    return bars


def fault_windows(history: list[Operation], end: float) -> list[Window]:
    """Inject to heal (a heal naming no open window's instance closes the oldest open window); a
    fault never healed runs to the end of the history; point faults (phase `act`) are points."""
    windows, open_ = [], []
    for op in (op for op in history if isinstance(op, Fault)):
        if op.phase == "inject":
            name = f"pause {op.instance} (batch {op.batch})" if op.fault == "pause" else f"{op.fault}: {op.command}"
            window = Window(name, op.time, end, healed=False)
            windows.append(window)
            open_.append((op.instance, window))
        elif op.phase == "heal":
            match = next((o for o in open_ if o[0] == op.instance), open_[0] if open_ else None)
            if match:
                open_.remove(match)
                match[1].end, match[1].healed = op.time, True
            else:
                windows.append(Window(f"{'heal' if op.fault == 'hook' else op.fault}: {op.command}", op.time, op.time))
        else:
            windows.append(Window(f"{op.fault} {op.request_id}".strip(), op.time, op.time))
    return windows


def summary(results: RunResults) -> str:
    columns = COLUMNS + sorted({column(c) for cfg in results.configs for c in cfg.requests} - set(COLUMNS))
    head = "".join(f"<th>{escape(name)}</th>" for name in ["configuration", "rule", "requests", *columns, "drained"])
    rows = []
    for cfg in results.configs:
        counts = Counter(column(c) for c in cfg.requests)
        drained = cfg.drain_word
        cells = "".join(f'<td class="n{"" if counts[name] else " zero"}" data-config="{escape(cfg.config)}" '
                        f'data-outcome="{escape(name)}">{counts[name]}</td>' for name in columns)
        rule = cfg.calibration.rule.value if cfg.calibration else ""
        rows.append(f"<tr><td>{escape(cfg.config)}</td><td>{rule}</td><td class=n>{len(cfg.requests)}</td>{cells}"
                    f'<td class="drained {escape(drained)}" data-config="{escape(cfg.config)}" '
                    f'data-leaks="{len(cfg.leaks)}">{escape(drained)}</td></tr>')
        rows += [f'<tr><td colspan=99 class="leak">leak after drain: {escape(leak)}</td></tr>' for leak in cfg.leaks]
    verdict = escape(results.verdict)
    return (f'<h1>pdcheck: PD vs oracle <span class="verdict {verdict}" id="verdict">{verdict}</span></h1>'
            f"<table class=summary><tr>{head}</tr>{''.join(rows)}</table>")


def failures(bars: list[Bar], folder: Path) -> str:
    items = [f'<li><a href="#d-{bar.index}">{escape(failure_line(bar.checked))}</a>'
             f"{''.join(f'<br><code>{escape(line)}</code>' for line in reproduce_lines(bar, folder))}</li>"
             for bar in bars if bar.is_failed]
    return f"<h2>Failures</h2><ul class=failures>{''.join(items)}</ul>" if items else ""


def timeline(bars: list[Bar], windows: list[Window]) -> str:
    if not bars and not windows:
        return "<h2>Timeline</h2><p>No requests in the history.</p>"
    rows = stack(bars)
    t0 = min([b.start for b in bars] + [w.start for w in windows])
    t1 = max([b.end for b in bars] + [w.end for w in windows])

    def at(t: float) -> float:
        return 100 * (t - t0) / ((t1 - t0) or 1)

    labels, tracks, top = [], [], 0
    for name, count in rows.items():
        height = count * ROW_PX + 4
        labels.append(f'<div class=lane style="height:{height}px" title="{escape(name)}">{escape(name)}</div>')
        tracks.append(f'<div class=track style="top:{top}px;height:{height}px" data-lane="{escape(name)}"></div>')
        tracks += [bar_html(b, at(b.start), at(b.end), top) for b in bars if b.lane == name]
        top += height
    tracks += [window_html(w, at(w.start), at(w.end)) for w in windows]
    return (f"<h2>Timeline</h2>{legend(bars)}<div class=timeline><div class=labels>{''.join(labels)}</div>"
            f'<div class=tracks style="height:{top}px">{"".join(tracks)}</div>'
            f"<div></div><div class=axis>{axis(t0, t1, at)}</div></div>")


def stack(bars: list[Bar]) -> dict[str, int]:
    """Give each bar the first row of its lane free at its start; the rows each lane needs."""
    ends: dict[str, list[float]] = {}
    for bar in bars:
        rows = ends.setdefault(bar.lane, [])
        bar.row = next((i for i, e in enumerate(rows) if e <= bar.start), len(rows))
        rows[bar.row : bar.row + 1] = [bar.end]
    return {name: len(rows) for name, rows in ends.items()}


def bar_html(bar: Bar, left: float, right: float, top: int) -> str:
    rid = bar.invoke.request_id
    title = f"{rid} ({bar.invoke.config}): {bar.outcome}, {bar.start:.3f}-{bar.end:.3f}s"
    return (f'<a class="bar o-{escape(bar.outcome)}{" failed" if bar.is_failed else ""}" href="#d-{bar.index}" '
            f'style="left:{left:.3f}%;width:{max(right - left, 0.2):.3f}%;top:{top + 2 + bar.row * ROW_PX}px" '
            f'title="{escape(title)}" data-request="{escape(rid)}" '
            f'data-config="{escape(bar.invoke.config)}" '
            f'data-lane="{escape(bar.lane)}" data-outcome="{escape(bar.outcome)}" data-failed="{int(bar.is_failed)}" '
            f'data-start="{bar.start}" data-end="{bar.end}"></a>')


def window_html(w: Window, left: float, right: float) -> str:
    title = f"{w.name}: {w.start:.3f}-{w.end:.3f}s" + ("" if w.healed else " (never healed)")
    return (f'<div class="fault{" point" if w.start == w.end else ""}" style="left:{left:.3f}%;'
            f'width:{max(right - left, 0.1):.3f}%" title="{escape(title)}" data-name="{escape(w.name)}" '
            f'data-start="{w.start}" data-end="{w.end}"><span>{escape(w.name)}</span></div>')


def axis(t0: float, t1: float, at) -> str:
    step = nice_step((t1 - t0) / 8)
    ticks = [step * i for i in range(math.ceil(t0 / step), math.floor(t1 / step) + 1)]
    return "".join(f'<span style="left:{at(t):.3f}%">{t:g}s</span>' for t in ticks)


def nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def legend(bars: list[Bar]) -> str:
    seen = dict.fromkeys(b.outcome for b in bars)
    keys = "".join(f'<span class="key o-{escape(o)}"></span>{escape(o)} ' for o in seen)
    return f'<p class=legend>{keys}<span class="key failed"></span>failed <span class="key shade"></span>fault</p>'


def details(bar: Bar, folder: Path) -> str:
    c, done = bar.checked, bar.done
    facts = {"configuration": bar.invoke.config, "lane": bar.lane, "prompt length": bar.invoke.prompt_len,
             "outcome": bar.outcome + (" (failed)" if bar.is_failed else ""),
             "time": f"invoked {bar.start:.3f}s, outcome {bar.end:.3f}s ({bar.end - bar.start:.3f}s)"}
    if c:
        facts |= {"rule": c.verdict.rule.value, "detail": c.verdict.detail, "external tokens": c.external_tokens,
                  "faulted": c.faulted, "known defect": c.known_defect, "leak": c.leak,
                  "transfer": json.dumps(msgspec.to_builtins(c.transfer)) if c.transfer else None}
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts.items() if v not in (None, ""))
    repro = "".join(f"<p><code>{escape(line)}</code></p>" for line in reproduce_lines(bar, folder))
    rid = escape(bar.invoke.request_id)
    tokens = token_diff(c, done.tokens, done.expected) if done else token_diff(c, None)
    return (f'<section class=detail id="d-{bar.index}" data-request="{rid}">'
            f'<h3>{rid} <a href="#">close</a></h3><dl>{rows}</dl>{tokens}{repro}</section>')


def token_diff(checked: Checked | None, got: list[int] | None, oracle: list[int] | None = None) -> str:
    """Positions, expected and got tokens: the oracle's whole output where the history has it,
    else only its window around the first difference."""
    v = checked.verdict if checked else None
    first = v.position if v else None
    start = max(0, first - WINDOW) if first is not None else 0
    if oracle is not None:
        expected = dict(enumerate(oracle))
    else:
        expected = dict(enumerate(v.expected, start)) if first is not None else {}
    if got is not None:
        got = dict(enumerate(got))
    else:
        got = dict(enumerate(v.actual, start)) if first is not None else {}
    positions = sorted(set(expected) | set(got))
    if not positions:
        return "<p>No tokens recorded.</p>"

    def cell(tokens: dict, i: int, side: str) -> str:
        classes = ["first-diff"] if i == first else []
        if i in expected and i in got and expected[i] != got[i]:
            classes.append("differs")
        if i not in tokens:
            classes.append("unrecorded")
        return (f'<td class="{" ".join(classes)}" data-side="{side}" data-position="{i}">'
                f"{tokens.get(i, '·' if side == 'expected' else '—')}</td>")

    head = "".join(f"<th class=first-diff>{i}</th>" if i == first else f"<th>{i}</th>" for i in positions)
    exp = "".join(cell(expected, i, "expected") for i in positions)
    act = "".join(cell(got, i, "got") for i in positions)
    note = (f"<p>First differing position: <b>{first}</b>. Expected tokens are the oracle's around it (· not "
            f"recorded); got is the PD output.</p>" if first is not None else "<p>Got: the PD output.</p>")
    return (f"{note}<div class=tokens><table><tr><th>position</th>{head}</tr><tr><th>expected</th>{exp}</tr>"
            f"<tr><th>got</th>{act}</tr></table></div>")


def reproduce_lines(bar: Bar, folder: Path) -> list[str]:
    """The repro file `pdcheck run` wrote for this failure, and a known defect's own reproducer."""
    c = bar.checked
    if c is None:
        return []
    lines = []
    repro = folder / f"repro-{c.prompt_len}-{c.config.replace('/', '-')}.json"
    if bar.is_failed and repro.exists():
        lines.append(f"reproduce: pdcheck repro {repro}")
    lines += [f"reproducer: {d.reproducer}" for d in KNOWN_DEFECTS if d.name == c.known_defect]
    return lines


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1 .verdict{padding:0 .4em;border-radius:4px;color:#fff}.verdict.valid{background:#2a8a3e}
.verdict.invalid{background:#c0392b}.verdict.unknown{background:#888}
table.summary{border-collapse:collapse}table.summary td,table.summary th{border:1px solid #ccc;padding:2px 8px}
td.n{text-align:right}td.zero{color:#bbb}td.drained.leak,td.leak{color:#c0392b;font-weight:bold}
.timeline{display:grid;grid-template-columns:18em 1fr;margin-top:1.8em}
.lane{border-top:1px solid #eee;font-size:12px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;
padding-right:.5em;line-height:20px}
.tracks{position:relative;background:#fafafa}.track{position:absolute;left:0;right:0;border-top:1px solid #eee}
.bar{position:absolute;height:12px;border-radius:2px;min-width:2px;z-index:2}
.bar.failed{outline:2px solid #000;z-index:3}.bar.failed::after{content:"✗";position:absolute;right:-12px;top:-4px;
font-size:12px;color:#000}
.o-match{background:#3cb371}.o-diverged{background:#e03131}.o-error{background:#f08c00}.o-hang{background:#862e9c}
.o-fallback{background:#fcc419}.o-known{background:#74c0fc}.o-leak{background:#5c3c00}.o-unfinished{background:#adb5bd}
.o-partial{background:repeating-linear-gradient(45deg,#fcc419 0 3px,#fff 3px 6px)}
.fault{position:absolute;top:0;bottom:0;background:rgba(255,120,0,.15);border-left:1px dashed #d9480f;
border-right:1px dashed #d9480f;z-index:1}.fault.point{background:none;border-right:none}
.fault span{position:absolute;top:-16px;font-size:11px;white-space:nowrap;color:#d9480f}
.axis{position:relative;height:18px;font-size:11px;color:#666}.axis span{position:absolute;transform:translateX(-50%)}
.legend .key{display:inline-block;width:12px;height:10px;margin:0 3px 0 8px}.key.failed{outline:2px solid #000}
.key.shade{background:rgba(255,120,0,.3)}
.detail{display:none;border:1px solid #ccc;padding:.5em 1em;margin-top:1em}.detail:target{display:block}
.detail dl{display:grid;grid-template-columns:10em 1fr;margin:0}.detail dd{margin:0;word-break:break-all}
.tokens{overflow-x:auto}
.tokens td,.tokens th{border:1px solid #ddd;padding:1px 4px;text-align:right;font:12px monospace}
.tokens .differs{background:#ffe3e3}.tokens .first-diff{background:#ff8787;font-weight:bold}
.tokens .unrecorded{color:#bbb}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body>
{body}
</body></html>
"""

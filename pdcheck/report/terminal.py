"""Terminal reports: a summary table with a row per configuration, and failure lines.

A request is counted in one column (`column`): `leak` where an instance still held it after the
drain, else the class it was judged to (`known` for a known defect as recorded).
"""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from pdcheck.known_defects import KNOWN_DEFECTS
from pdcheck.types import Checked, ConfigResult

COLUMNS = ["match", "diverged", "error", "hang", "fallback", "partial", "known", "leak"]


def column(checked: Checked) -> str:
    return "leak" if checked.leak else checked.counted or checked.verdict.outcome.value


def print_summary(console: Console, configs: list[ConfigResult]) -> None:
    table = Table(title="pdcheck: PD vs oracle")
    for name in ["configuration", "rule", "requests", *COLUMNS, "drained"]:
        table.add_column(name, justify="left" if name in ("configuration", "rule") else "right")
    for cfg in configs:
        counts = Counter(column(c) for c in cfg.requests)
        drained = cfg.drain_word
        rule = cfg.calibration.rule.value if cfg.calibration else ""
        table.add_row(cfg.config, rule, str(len(cfg.requests)), *(str(counts.get(name, 0)) for name in COLUMNS),
                      drained)
    console.print(table)


def print_known_defects(console: Console, configs: list[ConfigResult]) -> None:
    seen = {c.known_defect for cfg in configs for c in cfg.requests if c.counted == "known"}
    for defect in KNOWN_DEFECTS:
        if defect.name in seen:
            console.print(f"known defect {defect.name}: {defect.summary}\n  reproducer: {defect.reproducer}",
                          markup=False, highlight=False)


def failure_line(checked) -> str:
    v = checked.verdict
    where = f" at token {v.position}: expected {v.expected} got {v.actual}" if v.position is not None else ""
    expected = f" (known defect {checked.known_defect} no longer shows)" if checked.known_defect else ""
    if checked.leak:
        return f"{checked.config} len={checked.prompt_len} {v.request_id}: leak ({v.outcome.value}, then {checked.leak})"
    return f"{checked.config} len={checked.prompt_len} {v.request_id}: {v.outcome.value}{expected} {v.detail}{where}"

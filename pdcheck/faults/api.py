"""The fault protocols. A `Fault` knows its target and the history from construction: `inject()`
starts it, `heal()` ends it, each written to the history; healing a fault twice, or one that
heals itself (a point fault, a pause on its timer), does nothing the second time. A
`FaultSchedule` injects its faults when due and heals with `heal_all()` every fault it injected
that is not yet healed."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pdcheck import history as ops


@runtime_checkable
class Fault(Protocol):
    name: str

    def inject(self) -> None: ...

    def heal(self) -> None: ...


@runtime_checkable
class FaultSchedule(Protocol):
    def heal_all(self) -> None: ...


def record(history, fault: str, phase: str, **fields) -> None:
    """One step of a fault in the history: `inject`, `heal`, or `act` (a point fault)."""
    history.record(ops.Fault(fault=fault, phase=phase, **fields))

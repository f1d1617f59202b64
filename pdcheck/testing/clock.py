"""`FakeClock`: a clock for code that takes one (a `clock` argument read for the time), where a
test decides when time moves."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

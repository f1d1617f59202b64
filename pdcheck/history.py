"""The history: one append-only JSON-lines log of what was asked, what came back, and when.

Each line is one operation (`Op`), tagged by its `kind`, written and read as the same types:
- `Invoke`: a request is sent;
- `Ok` / `Fail` / `Info`: its outcome is known (`Info`: cut off, outcome unknown, never counted
  as a failure or a success); the three share `Completion`'s fields;
- `Fault`: a fault injected, healed, or (a point fault) acted out;
- `Note`: anything else worth keeping: calibration, an instance's drained state, metrics.
Every op has `time` (seconds since the history started, set by `History.record`) and `config`.
Defaults are left out of the lines. Lines are flushed as they are written, so a crash leaves a
readable prefix; `read_history` decodes them back, and a line that does not decode is an error
naming the file and line number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Union

import msgspec

from pdcheck.types import Calibration, EngineState, Transfer, Verdict


class Op(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="kind"):
    time: float = 0.0  # seconds since the history started; History.record sets it
    config: str = ""  # the configuration (or black-box phase) the op belongs to


class Invoke(Op, frozen=True, kw_only=True, tag="invoke"):
    """A request sent: to the pair `prefill` -> `decode` where the harness picked it."""

    request_id: str
    prompt_len: int | None = None
    topology: str = ""
    prefill: str = ""
    decode: str = ""
    body: dict[str, Any] | None = None  # a black-box API case's request body
    detail: str = ""  # what runs, where no prompt says it (a mutant's catching test)


class Completion(Op, frozen=True, kw_only=True):
    """A request's outcome with what the report shows of it: its verdict, what it loaded, and
    both whole token lists (`tokens` PD's, `expected` the oracle's) where they are known."""

    request_id: str
    verdict: Verdict | None = None
    external_tokens: int | None = None
    known_defect: str | None = None
    transfer: Transfer | None = None
    faulted: bool = False
    tokens: list[int] | None = None
    expected: list[int] | None = None
    detail: str = ""
    seconds: float | None = None


class Ok(Completion, frozen=True, kw_only=True, tag="ok"):
    pass


class Fail(Completion, frozen=True, kw_only=True, tag="fail"):
    pass


class Info(Completion, frozen=True, kw_only=True, tag="info"):
    """Cut off (a crash, a timeout): the outcome is unknown."""


class Fault(Op, frozen=True, kw_only=True, tag="fault"):
    """One step of a fault: `inject` opens its window, `heal` closes it (on `instance`, or the
    oldest one open where it names none), `act` is a point fault (a client fault)."""

    fault: str  # its kind: pause, kill, abort, hook, abort-mid-stream, disconnect, ...
    phase: str = "act"  # inject | heal | act
    batch: int | None = None
    instance: str = ""
    request_id: str = ""
    command: str = ""  # an operator hook's shell command
    before_request: int | None = None  # a hook: run before this workload request
    seconds: float | None = None  # a pause: how long; a hook: how long it ran
    returncode: int | None = None  # a hook's exit status; None if it was stopped
    output: str = ""  # a hook's output (its end)
    detail: str = ""


class Note(Op, frozen=True, kw_only=True, tag="note"):
    """Calibration, an instance's state after the drain (`instance` with `drained`; no
    `drained` where it was not running), the servers' metrics before and after a run."""

    calibration: Calibration | None = None
    instance: str = ""
    drained: EngineState | None = None
    metrics_before: dict[str, EngineState | None] | None = None
    metrics_after: dict[str, EngineState | None] | None = None
    request_id: str = ""
    detail: str = ""


Operation = Union[Invoke, Ok, Fail, Info, Fault, Note]


class History:
    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("ab")
        self.encoder = msgspec.json.Encoder()
        self.start = time.monotonic()

    def record(self, op: Op) -> None:
        op = msgspec.structs.replace(op, time=round(time.monotonic() - self.start, 6))
        self.file.write(self.encoder.encode(op) + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


DECODER = msgspec.json.Decoder(Operation)


def read_history(path: Path) -> list[Operation]:
    ops = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ops.append(DECODER.decode(line))
        except msgspec.DecodeError as error:
            raise ValueError(f"{path}:{number}: not a history op: {error}") from None
    return ops

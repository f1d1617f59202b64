"""What the harness and an engine instance say to each other, and what a request produced."""

from __future__ import annotations

import msgspec

from pdcheck.types import EngineState, GenRequest, GenResult


class Generate(msgspec.Struct, frozen=True, tag=True):
    requests: list[GenRequest]
    deadline_s: float


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


class Drain(msgspec.Struct, frozen=True, tag=True):
    """Step the idle engine until its KV blocks are all free again (or the timeout passes)."""

    timeout_s: float


class Ready(msgspec.Struct, frozen=True, tag=True):
    pid: int
    start_s: float


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The instance could not start or serve; `bad_input` says the user's input was at fault."""

    message: str
    bad_input: bool = False


class Results(msgspec.Struct, frozen=True, tag=True):
    results: list[GenResult]


ToWorker = Generate | Stop | Drain
FromWorker = Ready | Failed | Results | EngineState

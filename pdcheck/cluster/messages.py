"""What the harness and an engine instance say to each other, and what a request produced."""

from __future__ import annotations

import msgspec

from pdcheck.types import GenRequest, GenResult


class Generate(msgspec.Struct, frozen=True, tag=True):
    requests: list[GenRequest]
    deadline_s: float


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


class Drain(msgspec.Struct, frozen=True, tag=True):
    """Step the idle engine until its KV blocks are all free again (or the timeout passes)."""

    timeout_s: float


class EngineState(msgspec.Struct, frozen=True, tag=True):
    """What an engine holds: the fraction of KV blocks in use, and requests it still has.
    `held`: the request ids its scheduler still keeps (running, waiting, or finished with their
    blocks not yet freed), where the engine can be asked; a leak is charged to these."""

    kv_cache_usage: float
    running: int
    waiting: int
    held: tuple[str, ...] = ()
    connector: str = ""  # what the connector says it still buffers (its optional `held()`), if anything

    @property
    def idle(self) -> bool:
        return (self.kv_cache_usage == 0 and self.running == 0 and self.waiting == 0 and not self.held
                and not self.connector)


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

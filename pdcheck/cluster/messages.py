"""What the harness and an engine instance say to each other, and what a request produced."""

from __future__ import annotations

from typing import Any

import msgspec


class GenRequest(msgspec.Struct, frozen=True):
    """One greedy generation request, by token ids."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    num_logprobs: int = 5
    kv_transfer_params: dict[str, Any] | None = None
    arrive_step: int = 0  # added to the engine at its n-th step of the batch (staggered arrivals)
    abort_step: int | None = None  # aborted by its client before the engine's n-th step of the batch
    abort_leg: str | None = None  # through PD: the leg ("prefill" or "decode") `abort_step` applies to


class GenResult(msgspec.Struct):
    """What one request produced on one instance (or on the PD pair, once joined).

    `num_cached_tokens` is vLLM's count of prompt tokens not computed: those found in the local
    prefix cache (`local_cached_tokens`, known in-process only) plus those loaded through the
    connector (`external_tokens`).
    """

    request_id: str
    token_ids: list[int] = []
    logprobs: list[float] = []
    top_logprobs: list[dict[int, float]] = []
    num_cached_tokens: int = 0
    local_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    error: str | None = None
    hung: bool = False
    cached_tokens_reported: bool = True  # False where a server's answer does not say (HTTP without it)

    @property
    def external_tokens(self) -> int:
        return self.num_cached_tokens - self.local_cached_tokens

    @property
    def ok(self) -> bool:
        return self.error is None and not self.hung


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

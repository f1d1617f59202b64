"""The types every part shares: a request, what it produced, and the verdict on it.

This module imports nothing from pdcheck: clusters, clients, checkers and reports all build on it.
"""

from __future__ import annotations

import enum
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


class PDResult(msgspec.Struct):
    """A request's joined output; `external_tokens` is what decode loaded through the connector,
    `local_tokens` what it found in its own prefix cache."""

    result: GenResult
    external_tokens: int
    prefill: GenResult
    local_tokens: int = 0

    @classmethod
    def served(cls, result: GenResult) -> PDResult:
        """An answer from a server that joined the legs itself (a proxy, a deployment from outside):
        the prompt tokens it reports cached are taken as loaded."""
        return cls(result=result, external_tokens=result.num_cached_tokens, prefill=GenResult(result.request_id))


class Outcome(enum.Enum):
    MATCH = "match"
    DIVERGED = "diverged"
    ERROR = "error"
    HANG = "hang"
    FALLBACK = "fallback"
    PARTIAL = "partial"


class Rule(enum.Enum):
    STRICT = "strict"
    TOLERANT = "tolerant"


class Verdict(msgspec.Struct):
    request_id: str
    outcome: Outcome
    rule: Rule
    detail: str = ""
    position: int | None = None
    expected: list[int] = []
    actual: list[int] = []
    max_logprob_diff: float = 0.0
    tie_at: int | None = None  # the accepted near-tie (tolerant rule) the tokens were judged to


class Transfer(msgspec.Struct):
    """What both sides recorded about one transfer key."""

    saved_blocks: int = 0
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    errors: list[str] = []


class Calibration(msgspec.Struct, frozen=True):
    rule: Rule
    tolerance: float
    self_diff: float
    detail: str


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


class Checked(msgspec.Struct, frozen=True):
    """A request's verdict with what it needs for reports and replay."""

    config: str
    prompt_len: int
    verdict: Verdict
    external_tokens: int
    local_tokens: int = 0  # prompt tokens decode found in its own prefix cache
    known_defect: str | None = None
    counted: str = ""  # the summary column: the outcome, or `known` for a known defect as recorded
    transfer: Transfer | None = None  # what the connector's transfer log says moved, if it keeps one
    faulted: bool = False  # a fault hit its batch: a clean error (or a recompute) is then allowed
    leak: str | None = None  # an instance still held the request after the drain (see `leaks`)

    @property
    def outcome(self) -> str:
        """The class the request ends in: its verdict's outcome, or `leak`."""
        return "leak" if self.leak else self.verdict.outcome.value

    @property
    def passed(self) -> bool:
        """Matched with no known defect expected, or showed a known defect as recorded; never
        a request still held after the drain, nor one that loaded only part of its prompt."""
        if self.leak:
            return False
        if self.known_defect:
            return self.counted == "known"
        if self.faulted:
            return self.verdict.outcome in (Outcome.MATCH, Outcome.ERROR, Outcome.FALLBACK)  # never PARTIAL
        return self.verdict.outcome is Outcome.MATCH


class FaultKind(enum.StrEnum):
    """What a planned process fault does to its batch (pdcheck.faults.process). A str enum: a
    plan written as strings ("prefill", "abort", ...) is the same plan."""

    PAUSE_PREFILL = "prefill"  # prefill paused between the legs: decode's pull meets a silent peer
    PAUSE_DECODE = "decode"  # decode paused as the batch starts
    ABORT = "abort"  # the client abandons the batch between the legs
    KILL = "kill"  # prefill killed between the legs; its deployment restarts it before its next batch
    RESTART = "restart"  # prefill killed between the legs and started again before decode's leg


class Planned(msgspec.Struct, frozen=True):
    """A fault planned for the `batch`-th batch of a configuration's requests."""

    batch: int
    target: FaultKind
    seconds: float  # how long a pause lasts (the other kinds have no window: 0)


class ConfigResult(msgspec.Struct, frozen=True):
    """What one configuration (or black-box phase) ended with, once its instances were drained:
    every request's verdict in the order sent, the instances still holding something after the
    drain (`leaks`), and the faults planned for it. Never changed after it is made."""

    config: str
    calibration: Calibration | None
    requests: tuple[Checked, ...]
    leaks: tuple[str, ...] = ()
    faults: tuple[Planned, ...] = ()
    drained: str = ""  # black-box mode: "clean", "leak" or "unknown", from the servers' metrics

    @property
    def failures(self) -> list[Checked]:
        return [c for c in self.requests if not c.passed]

    @property
    def drain_word(self) -> str:
        """The summary's word for the drain: black-box mode's own, else leak or clean."""
        return self.drained or ("leak" if self.leaks else "clean")


class RunResults(msgspec.Struct, frozen=True):
    """results.json: the run's verdict ("valid" or "invalid") and each configuration's result."""

    verdict: str
    configs: tuple[ConfigResult, ...]

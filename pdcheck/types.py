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

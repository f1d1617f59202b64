"""Judge one PD output against the oracle: an outcome, the rule that judged it, and where.

Rules:
- strict: token ids equal and each sampled token's logprob bitwise equal.
- tolerant: used where the oracle is not bitwise stable against itself. Tokens are compared up
  to the first divergence, which is accepted only if each side's token is in the other side's
  top-k logprobs there; logprobs before it may differ by at most the calibrated tolerance.
Outcome order: hang, error, diverged, fallback (matched, but nothing was loaded), match.
"""

from __future__ import annotations

import enum

import msgspec

from pdcheck.cluster.messages import GenResult

WINDOW = 4


class Outcome(enum.Enum):
    MATCH = "match"
    DIVERGED = "diverged"
    ERROR = "error"
    HANG = "hang"
    FALLBACK = "fallback"


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


def first_divergence(expected: list[int], actual: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            return i
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def window(tokens: list[int], position: int) -> list[int]:
    return tokens[max(0, position - WINDOW) : position + WINDOW]


def within_top_k(oracle: GenResult, pd: GenResult, i: int) -> bool:
    if i >= min(len(oracle.top_logprobs), len(pd.top_logprobs)):
        return False
    return pd.token_ids[i] in oracle.top_logprobs[i] and oracle.token_ids[i] in pd.top_logprobs[i]


def judge(
    oracle: GenResult, pd: GenResult, rule: Rule, tolerance: float, external_tokens: int, expects_transfer: bool
) -> Verdict:
    rid = pd.request_id
    if pd.hung:
        return Verdict(rid, Outcome.HANG, rule, detail=pd.error or "deadline passed")
    if not oracle.ok:
        if not pd.ok:
            return Verdict(rid, Outcome.MATCH, rule, detail=f"both rejected: {pd.error}")
        return Verdict(rid, Outcome.ERROR, rule, detail=f"oracle failed but PD did not: {oracle.error}")
    if not pd.ok:
        return Verdict(rid, Outcome.ERROR, rule, detail=pd.error)
    position = first_divergence(oracle.token_ids, pd.token_ids)
    compared = len(oracle.token_ids) if position is None else position
    diffs = [abs(a - b) for a, b in zip(oracle.logprobs[:compared], pd.logprobs[:compared])]
    max_diff = max(diffs, default=0.0)
    if position is not None and not (rule is Rule.TOLERANT and within_top_k(oracle, pd, position)):
        return Verdict(
            rid, Outcome.DIVERGED, rule, detail=f"token {position} differs", position=position,
            expected=window(oracle.token_ids, position), actual=window(pd.token_ids, position), max_logprob_diff=max_diff,
        )
    limit = 0.0 if rule is Rule.STRICT else tolerance
    bad = next((i for i, d in enumerate(diffs) if d > limit), None)
    if bad is not None:
        return Verdict(
            rid, Outcome.DIVERGED, rule, position=bad, max_logprob_diff=max_diff,
            detail=f"logprob of token {bad} differs by {diffs[bad]:.3g} (allowed {limit:.3g})",
            expected=window(oracle.token_ids, bad), actual=window(pd.token_ids, bad),
        )
    if expects_transfer and external_tokens == 0:
        return Verdict(rid, Outcome.FALLBACK, rule, detail="tokens match but decode loaded no external KV")
    note = "" if position is None else f"accepted near-tie at token {position}"
    return Verdict(rid, Outcome.MATCH, rule, detail=note, max_logprob_diff=max_diff)

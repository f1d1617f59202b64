"""Judge one PD output against the oracle: an outcome, the rule that judged it, and where.

Rules:
- strict: token ids equal and each sampled token's logprob bitwise equal.
- tolerant: used where the oracle is not bitwise stable against itself. Tokens are compared up
  to the first divergence, which is accepted as a near-tie only if each side's token is in the
  other side's top-k logprobs there (the verdict's `tie_at`; gate.judge_after_ties then judges
  the rest against the oracle continuing from PD's tokens); logprobs before it may differ by at
  most the calibrated tolerance.
Under both rules PD's output must be well formed: a finite logprob and a top-logprobs entry for
every token it returned, else it is diverged.
Both sides failing is a match only when the errors agree once ids are taken out (`error_key`).
Outcome order: hang, error, diverged, fallback (matched, but nothing was loaded), partial
(matched, but fewer prompt tokens loaded than expected), match.
"""

from __future__ import annotations

import math
import re


from pdcheck.types import GenResult, Outcome, Rule, Verdict

WINDOW = 4
# in error messages: uuids, hex runs of 8+ with a digit, numbers of 5+ digits (request and
# engine ids, ports, timestamps); status codes and token counts are kept
ID_LIKE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
                     r"|\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b|\d{5,}")


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


def malformed(pd: GenResult) -> tuple[int, str] | None:
    """The first of PD's tokens without a finite logprob or a top-logprobs entry, and why."""
    for i in range(len(pd.token_ids)):
        if i >= len(pd.logprobs):
            return i, f"PD returned {len(pd.logprobs)} logprobs for {len(pd.token_ids)} tokens"
        if not math.isfinite(pd.logprobs[i]):
            return i, f"PD's logprob of token {i} is {pd.logprobs[i]}"
        if i >= len(pd.top_logprobs) or not pd.top_logprobs[i]:
            return i, f"PD returned no top logprobs for token {i}"
    return None


def error_key(error: str | None, request_id: str) -> str:
    """An error message with the request id and id-like runs (ID_LIKE) replaced by `#`."""
    error = error or ""
    return ID_LIKE.sub("#", error.replace(request_id, "#") if request_id else error)


def judge_failures(oracle: GenResult, pd: GenResult, rule: Rule) -> Verdict:
    """Either side failed (PD did not hang)."""
    rid = pd.request_id
    if oracle.ok:
        return Verdict(rid, Outcome.ERROR, rule, detail=pd.error)
    if pd.ok:
        return Verdict(rid, Outcome.ERROR, rule, detail=f"oracle failed but PD did not: {oracle.error}")
    if error_key(oracle.error, oracle.request_id) == error_key(pd.error, rid):
        return Verdict(rid, Outcome.MATCH, rule, detail=f"both rejected: {pd.error}")
    detail = f"both failed, differently: oracle: {oracle.error}; PD: {pd.error}"
    return Verdict(rid, Outcome.ERROR, rule, detail=detail)


def diverged(oracle: GenResult, pd: GenResult, rule: Rule, position: int, detail: str,
             max_diff: float = 0.0) -> Verdict:
    return Verdict(pd.request_id, Outcome.DIVERGED, rule, detail=detail, position=position, max_logprob_diff=max_diff,
                   expected=window(oracle.token_ids, position), actual=window(pd.token_ids, position))


def load_shortfall(external_tokens: int, expected_external: int) -> tuple[Outcome, str] | None:
    if expected_external > 0 and external_tokens == 0:
        return Outcome.FALLBACK, "tokens match but decode loaded no external KV"
    if 0 < external_tokens < expected_external:
        return Outcome.PARTIAL, (f"tokens match but decode loaded {external_tokens} of {expected_external} "
                                 f"expected prompt tokens")
    return None


def judge(
    oracle: GenResult, pd: GenResult, rule: Rule, tolerance: float, external_tokens: int, expected_external: int
) -> Verdict:
    """`expected_external`: the prompt tokens decode should have loaded (0: no transfer due)."""
    rid = pd.request_id
    if pd.hung:
        return Verdict(rid, Outcome.HANG, rule, detail=pd.error or "deadline passed")
    if not (oracle.ok and pd.ok):
        return judge_failures(oracle, pd, rule)
    if problem := malformed(pd):
        return diverged(oracle, pd, rule, *problem)
    position = first_divergence(oracle.token_ids, pd.token_ids)
    compared = len(oracle.token_ids) if position is None else position
    diffs = [abs(a - b) for a, b in zip(oracle.logprobs[:compared], pd.logprobs[:compared])]
    max_diff = max(diffs, default=0.0)
    if position is not None and not (rule is Rule.TOLERANT and within_top_k(oracle, pd, position)):
        return diverged(oracle, pd, rule, position, f"token {position} differs", max_diff)
    limit = 0.0 if rule is Rule.STRICT else tolerance
    bad = next((i for i, d in enumerate(diffs) if d > limit), None)
    if bad is not None:
        detail = f"logprob of token {bad} differs by {diffs[bad]:.3g} (allowed {limit:.3g})"
        return diverged(oracle, pd, rule, bad, detail, max_diff)
    outcome, detail = load_shortfall(external_tokens, expected_external) or (Outcome.MATCH, "")
    if position is not None:
        detail = "; ".join(filter(None, [detail, f"accepted near-tie at token {position}"]))
    return Verdict(rid, outcome, rule, detail=detail, max_logprob_diff=max_diff, tie_at=position)

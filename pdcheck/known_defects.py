"""Defects the gate has found in connectors it does not own, recorded as expected failures.

Each entry names the connector class it applies to (a qualified name, matched against the
resolved class's lineage, so a subclass inherits it and the string a user typed does not
matter), the requests it hits, and its symptom: the outcome and a pattern its verdict's detail
must match. A request counts as `known` only when both match; another outcome, or the same
outcome for another reason, is a failure. Suites mark such requests as strict expected failures
(a fix turns them into a failure to update this table); `pdcheck run` counts them apart and
prints their reproducer.
"""

from __future__ import annotations

import dataclasses
import re

from pdcheck.checker.compare import Outcome, Verdict
from pdcheck.profiles import EXAMPLE_CLASS


@dataclasses.dataclass(frozen=True)
class KnownDefect:
    name: str
    connector: str  # the qualified class name it applies to, and to its subclasses
    outcome: Outcome
    detail: str  # a regex the verdict's detail must match (re.search)
    summary: str
    reproducer: str

    def applies(self, lineage: tuple[str, ...], prompt_len: int, block_size: int, earlier: list[int]) -> bool:
        return self.connector in lineage and RULES[self.name](prompt_len, block_size, earlier)

    def shows(self, verdict: Verdict) -> bool:
        """The verdict is this defect's symptom: its outcome, for its reason."""
        return verdict.outcome is self.outcome and re.search(self.detail, verdict.detail or "") is not None


RULES = {
    # Decode's prompt is the prompt plus prefill's token, so L + 1 tokens. The match check hashes
    # the first align(L) tokens, the load hashes the first align(L + 1); they differ when L is a
    # multiple of the block size, and the load opens a file that was never written.
    "example-connector-block-multiple": lambda n, b, earlier: n % b == 0 and n >= 2 * b,
    # Prefill saves the first align(L) tokens unless a folder for the first align(L - 1) exists.
    # For L = b + 1 that is the empty prefix, which any earlier prompt of at most b tokens made,
    # so the prompt is never saved and decode silently recomputes it.
    "example-connector-skips-save-after-short-prompt": lambda n, b, earlier: n == b + 1 and min(earlier, default=n) <= b,
}

KNOWN_DEFECTS = [
    KnownDefect(
        name="example-connector-block-multiple",
        connector=EXAMPLE_CLASS,
        outcome=Outcome.ERROR,
        detail="FileNotFoundError",
        summary=(
            "ExampleConnector: a prompt of k*block_size tokens (k >= 2) fails on decode with "
            "FileNotFoundError: get_num_new_matched_tokens looks up a hash of align(L) tokens, "
            "start_load_kv loads a hash of align(L+1) tokens, which prefill never saved"
        ),
        reproducer="pdcheck run --model tiny-llama --dtype float32 --lengths 64",
    ),
    KnownDefect(
        name="example-connector-skips-save-after-short-prompt",
        connector=EXAMPLE_CLASS,
        outcome=Outcome.FALLBACK,
        detail="loaded no external KV",
        summary=(
            "ExampleConnector: after any prompt of at most block_size tokens, a prompt of "
            "block_size+1 tokens is never saved by prefill (its save check looks up the empty "
            "prefix, which exists), so decode silently recomputes it: no KV is transferred"
        ),
        reproducer="pdcheck run --model tiny-llama --dtype float32 --lengths 31,33",
    ),
]


def known_defect(lineage: tuple[str, ...], prompt_len: int, block_size: int, earlier: list[int]) -> KnownDefect | None:
    """The defect expected for a prompt of `prompt_len` after prompts of `earlier` lengths, on a
    connector whose class has this `lineage` (its MRO as qualified names)."""
    return next((d for d in KNOWN_DEFECTS if d.applies(lineage, prompt_len, block_size, earlier)), None)

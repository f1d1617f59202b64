"""Defects the gate has found in connectors it does not own, recorded as expected failures.

Each entry names the connector, the requests it hits, and the outcome the gate reports for
them. Suites mark such requests as strict expected failures (a fix turns them into a failure
to update this table); `pdcheck run` counts them apart and prints their reproducer.
"""

from __future__ import annotations

import dataclasses

from pdcheck.checker.compare import Outcome


@dataclasses.dataclass(frozen=True)
class KnownDefect:
    name: str
    connector: str
    outcome: Outcome
    summary: str
    reproducer: str

    def applies(self, connector_name: str, prompt_len: int, block_size: int, earlier: list[int]) -> bool:
        return connector_name == self.connector and RULES[self.name](prompt_len, block_size, earlier)


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
        connector="ExampleConnector",
        outcome=Outcome.ERROR,
        summary=(
            "ExampleConnector: a prompt of k*block_size tokens (k >= 2) fails on decode with "
            "FileNotFoundError: get_num_new_matched_tokens looks up a hash of align(L) tokens, "
            "start_load_kv loads a hash of align(L+1) tokens, which prefill never saved"
        ),
        reproducer="pdcheck run --model tiny-llama --dtype float32 --lengths 64",
    ),
    KnownDefect(
        name="example-connector-skips-save-after-short-prompt",
        connector="ExampleConnector",
        outcome=Outcome.FALLBACK,
        summary=(
            "ExampleConnector: after any prompt of at most block_size tokens, a prompt of "
            "block_size+1 tokens is never saved by prefill (its save check looks up the empty "
            "prefix, which exists), so decode silently recomputes it: no KV is transferred"
        ),
        reproducer="pdcheck run --model tiny-llama --dtype float32 --lengths 31,33",
    ),
]


def known_defect(connector_name: str, prompt_len: int, block_size: int, earlier: list[int]) -> KnownDefect | None:
    """The defect expected for a prompt of `prompt_len` after prompts of `earlier` lengths."""
    return next((d for d in KNOWN_DEFECTS if d.applies(connector_name, prompt_len, block_size, earlier)), None)

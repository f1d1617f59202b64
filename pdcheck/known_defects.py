"""Defects the gate has found in connectors it does not own, recorded as expected failures.

Two granularities. A KnownDefect is per request (the block-boundary workload, `pdcheck run`).
A RecordedFailure is per battery test: a test of pdcheck/conformance/ the connector fails as a
whole (a defect that takes down every request of a decode step, say), with a pattern its
failure message must match; the battery reports it as a strict expected failure.

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

from pdcheck.profiles import EXAMPLE_CLASS, MOONCAKE_CLASS, MULTI_CLASS, NIXL_CLASS
from pdcheck.types import Outcome, Verdict


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


@dataclasses.dataclass(frozen=True)
class RecordedFailure:
    """A battery test a connector class is recorded to fail, and the symptom it fails with."""

    name: str
    connector: str  # the qualified class name it applies to, and to its subclasses
    test: str  # a regex the test's name must match (re.fullmatch)
    symptom: str  # a regex its failure message must match (re.search)
    summary: str

    def applies(self, lineage: tuple[str, ...], test_name: str) -> bool:
        return self.connector in lineage and re.fullmatch(self.test, test_name) is not None

    def shows(self, message: str) -> bool:
        return re.search(self.symptom, message) is not None


EXAMPLE = "vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py"  # vLLM 0.32, as lines below cite
NIXL = "vllm/distributed/kv_transfer/kv_connector/v1/nixl"  # vLLM 0.32
MOONCAKE = "vllm/distributed/kv_transfer/kv_connector/v1/mooncake/mooncake_connector.py"  # vLLM 0.32

RECORDED_FAILURES = [
    RecordedFailure(
        name="example-connector-chunked-prefill",
        connector=EXAMPLE_CLASS,
        test=r"test_long_prompts_prefilled_in_chunks_match|test_requests_aborted_during_a_leg_end_as_errors_and_the_"
             r"rest_match\[mid-prefill\]",
        symptom=r"shape mismatch: value tensor of shape|: diverged",
        summary=(
            "ExampleConnector with chunked prefill: a request is saved only in the step it is first scheduled "
            f"({EXAMPLE}:328-352), under the hash of align(L) tokens but with the slot mapping cut to the blocks "
            "allocated so far (:50-59). A first chunk shorter than align(L) - block_size saves fewer rows than decode "
            "loads (shape mismatch at :156); a longer one saves rows not yet computed, which decode loads as KV "
            "(a silent divergence)"
        ),
    ),
    RecordedFailure(
        name="example-connector-resumed-request-hash",
        connector=EXAMPLE_CLASS,
        test=r"test_requests_preempted_on_decode_resume_with_the_oracles_tokens",
        symptom=r"FileNotFoundError",
        summary=(
            "ExampleConnector after a decode preemption: the resumed request's load is built from all its tokens, "
            f"generated ones included ({EXAMPLE}:355-376), so once it has generated past a block boundary the hash "
            "names a file prefill never saved, and the load raises out of the engine step"
        ),
    ),
    RecordedFailure(
        name="example-connector-block-size-asymmetry",
        connector=EXAMPLE_CLASS,
        test=r"test_sides_that_disagree_fail_cleanly_or_match\[block-size\]",
        symptom=r"asymmetric-block-size-\d-len\d+: diverged",
        summary=(
            "ExampleConnector with prefill at block size 32 and decode at 64: decode loads the saved KV and decodes "
            "wrong tokens from its second one (prefill's first token is right), with no error. It checks nothing of "
            "the two sides' settings: its files are keyed by a hash of the prompt's tokens only "
            f"({EXAMPLE}:50-59 builds the slot mapping from decode's own block size). Single engines at block "
            "sizes 32 and 64 give the same tokens, so the divergence comes from the transfer"
        ),
    ),
    RecordedFailure(
        name="nixl-block-size-ratio-cpu-layout",
        connector=NIXL_CLASS,
        test=r"test_sides_that_disagree_fail_cleanly_or_match\[block-size\]",
        symptom=r"asymmetric-block-size-\d-len\d+: diverged",
        summary=(
            "NixlConnector on CPU with prefill at block size 32 and decode at 64: the handshake accepts the ratio "
            f"({NIXL}/base_worker.py:2482-2489 refuses it only with a host buffer, and on CPU there is none, :697), "
            "each 32-token block is read into half of a 64-token block, and the received blocks are regrouped as if "
            "each head's block were token-major rows (:2775-2778, kv_connector/utils.py:244-269; the tail zeroing "
            "at :2786-2787 makes the same assumption). CPU attention packs each head's block as K transposed "
            "[head_dim, block_size] then V [block_size, head_dim] (v1/attention/backends/cpu_attn.py:463-488), so "
            "only V of the second half lands right: decode loads L tokens and decodes wrong ones, with no error"
        ),
    ),
    RecordedFailure(
        name="nixl-replayed-transfer-params",
        connector=NIXL_CLASS,
        test=r"test_replayed_transfer_params_are_refused_or_recomputed",
        symptom=r"replayed \S+: diverged: [^\n]*\(loaded [1-9]\d* tokens\)",
        summary=(
            "NixlConnector serves consumed kv_transfer_params again: decode keeps no record of the remote request "
            "ids it has read and counts the whole prompt as external for any params with do_remote_prefill "
            f"({NIXL}/pull_scheduler.py:59-65), then reads remote_block_ids from prefill's registered pool with a "
            "one-sided NIXL read (pull_worker.py:136-, no expiry check for prefill's params: :152 and "
            "pull_scheduler.py:264-269). Prefill, which freed and reused those blocks after the first read, learns "
            "of the second one only from its notification and logs 'Potentially invalid KV blocks for unrecognized "
            "request' (pull_worker.py:661-673); decode never hears of it and decodes from another request's KV"
        ),
    ),
    RecordedFailure(
        name="nixl-read-after-lease",
        connector=NIXL_CLASS,
        test=r"test_a_decode_leg_after_the_lease_never_reads_reused_blocks",
        symptom=r"late \S+: diverged: [^\n]*\(loaded [1-9]\d* tokens\)",
        summary=(
            "NixlConnector when decode's leg comes after prefill's lease (kv_lease_duration, 30 s) ran out and "
            "other prompts reused the blocks: prefill frees the blocks at the lease's end, decode still counts the "
            f"whole prompt as external ({NIXL}/pull_scheduler.py:59-65) and reads remote_block_ids with a one-sided "
            "NIXL read that checks no lease (pull_worker.py:136-, :152), so it decodes from another request's KV "
            "with no error: the class of aws-do-eks #84 (8 of 42 requests decoded from released blocks, HTTP 200)"
        ),
    ),
    RecordedFailure(
        name="mooncake-dead-prefill-hang",
        connector=MOONCAKE_CLASS,
        test=r"test_faulted_request_ends_cleanly_and_the_next_ones_match\[prefill-(killed|restarted)\]",
        symptom=r"prefill-(killed|restarted)-\d+-len\d+: leak \(hang, then decode0 still holds it after the drain\)",
        summary=(
            "MooncakeConnector when prefill dies before decode's pull: decode asks the prefill worker address it "
            f"cached for that engine id ({MOONCAKE}:2527-2548, never asked again of the bootstrap server) over a "
            "ZMQ DEALER socket and waits for the reply with RCVTIMEO = VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT + 60 s "
            f"({MOONCAKE}:2345-2367: 540 s by default, 80 s in pdcheck's profile); nothing notices the peer is gone "
            "(a restarted prefill listens on a new random port, :1444). The request hangs that long, and aborted "
            "by the client meanwhile it keeps its blocks until the receive times out"
        ),
    ),
]


def through_multi_connector(name: str, child: str) -> RecordedFailure:
    """A child connector's recorded failure as MultiConnector shows it (its profile composes
    NixlConnector for PD with an ExampleConnector store of each instance's own)."""
    recorded = next(r for r in RECORDED_FAILURES if r.name == name)
    return dataclasses.replace(recorded, name=f"multi-connector-{name}", connector=MULTI_CLASS,
                               summary=f"MultiConnector through its {child} child: {recorded.summary}")


# The store child's defect shows on decode: a resumed request is not NIXL's any more (its params
# were consumed), so MultiConnector asks the store, which loads a hash of all the request's tokens.
RECORDED_FAILURES += [through_multi_connector(name, child) for name, child in (
    ("nixl-block-size-ratio-cpu-layout", "NixlConnector"), ("nixl-replayed-transfer-params", "NixlConnector"),
    ("nixl-read-after-lease", "NixlConnector"), ("example-connector-resumed-request-hash", "ExampleConnector store"))]


def recorded_failure(lineage: tuple[str, ...], test_name: str) -> RecordedFailure | None:
    """The failure recorded for this battery test on a connector of this lineage, if any."""
    return next((r for r in RECORDED_FAILURES if r.applies(lineage, test_name)), None)

"""The known-bug catalogue: one entry per mutant, with the bug class it re-creates and the
quick-tier test that catches it.

An entry names its mutant by `module:attribute` and its catching test by pytest node id, both as
strings: nothing here imports a mutant (several import vLLM or CUDA libraries), so listing the
catalogue is free. A catching test asserts the mutant's failure, so the test passing means the
mutant was caught; `pdcheck mutants` (pdcheck.bench.mutants) runs them. Bug classes are the rows
of BUGS.md, issue numbers as BUGS.md gives them. suites/test_mutants.py checks that every test
node exists and that every mutant in pdcheck/mutants/ has an entry here.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util

from pdcheck.errors import BadInput


class Tier(enum.Enum):
    CPU = "CPU"
    GPU = "GPU"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # what `pdcheck mutants --only` takes
    bug_class: str  # the BUGS.md row
    issues: str  # vLLM issues and pull requests, as BUGS.md gives them ("" where it gives none)
    recreates: str  # what the mutant does wrong, in a line
    mutant: str  # module:attribute
    test: str  # the pytest node id of the quick-tier test that catches it
    tier: Tier = Tier.CPU

    def __post_init__(self):
        if ":" not in self.mutant or "::" not in self.test:
            raise ValueError(f"catalogue entry {self.name!r}: mutant {self.mutant!r} must be module:attribute "
                             f"and test {self.test!r} a pytest node id")

    @property
    def module(self) -> str:
        return self.mutant.partition(":")[0]

    @property
    def is_present(self) -> bool:
        """Whether the mutant's module exists (found, not imported)."""
        return importlib.util.find_spec(self.module) is not None


CONNECTOR = "pdcheck.mutants.connector"
MUTANTS_SUITE = "suites/test_mutants.py"
LATE_READ = f"{MUTANTS_SUITE}::test_send_reading_blocks_freed_before_it_is_caught_as_divergence"
CONTROLS = "suites/test_negative_controls.py"
ROUTING = "suites/test_uneven_polling.py"
PROTOCOL = "suites/test_protocol_model.py::test_protocol_mutant_is_caught_by_the_state_machine"
BATTERY = "suites/test_battery_controls.py::test_mutant_under_test_is_caught_by_its_failure_class"

CATALOGUE: tuple[Entry, ...] = (
    Entry("DeferredExtraction", "repeated identical prompts give garbage", "#22965, #23403",
          "put_async send thread extracts KV from the live cache late; the hand-off counts as the send",
          f"{CONNECTOR}:DeferredExtraction", f"{LATE_READ}[DeferredExtraction]"),
    Entry("FreeBeforeSend", "blocks freed before send completes", "#21570, #52234",
          "done sending reported when the scheduler finishes the request; the send reads the blocks later",
          f"{CONNECTOR}:FreeBeforeSend", f"{LATE_READ}[FreeBeforeSend]"),
    Entry("PromptKeys", "repeated identical prompts give garbage", "#22965",
          "transfer keys made from the prompt: identical prompts in flight share one key",
          f"{CONNECTOR}:PromptKeys",
          "suites/test_repeated_prompts.py::test_transfer_keys_made_from_the_prompt_are_caught_under_concurrent_repeats"),
    Entry("NoReceiveDeadline", "unbounded waits", "#44831",
          "decode's receive waits for a lost push with no deadline",
          f"{CONNECTOR}:NoReceiveDeadline",
          f"{MUTANTS_SUITE}::test_receive_without_a_deadline_is_caught_as_a_hang[NoReceiveDeadline]"),
    Entry("KeepUnpulled", "leaks on abort", "#46283",
          "prefill keeps KV nobody pulls forever: a request abandoned between the legs never frees its blocks",
          f"{CONNECTOR}:KeepUnpulled", "suites/test_aborts.py::test_keeping_unpulled_kv_is_caught_as_a_leak_of_each_abandoned_request"),
    Entry("NoPullDeadline", "unbounded waits", "#44831",
          "decode's pull of a silent (paused) prefill retries with no deadline",
          f"{CONNECTOR}:NoPullDeadline",
          "suites/test_process_faults.py::test_a_pull_with_no_deadline_is_caught_hanging_on_the_paused_prefill"),
    Entry("TakeKeepsKV", "leaks on abort", "#46283",
          "decode's receive buffer keeps pushed KV after its load took it: its room is never given back",
          "pdcheck.mutants.protocol:TakeKeepsKV", f"{PROTOCOL}[TakeKeepsKV]"),
    Entry("NoReplyDeadline", "unbounded waits", "#44831",
          "a control request waits for its reply past the caller's deadline",
          "pdcheck.mutants.protocol:NoReplyDeadline", f"{PROTOCOL}[NoReplyDeadline]"),
    Entry("EngineLocalKeys", "transfer keys differ across instances", "#42839",
          "transfer keys built from engine-local request ids", f"{CONNECTOR}:EngineLocalKeys",
          f"{MUTANTS_SUITE}::test_engine_local_transfer_keys_are_caught_as_errors"),
    Entry("SkipMissingKV", "missing KV skipped silently", "#52234 (NIXL)",
          "a failed load is logged and skipped; decode runs on unloaded blocks", f"{CONNECTOR}:SkipMissingKV",
          "suites/test_buffer_pressure.py::test_skipping_kv_that_did_not_fit_is_caught_as_divergence"),
    Entry("CorruptOnLoad", "garbled output, CUDA streams", "#20263",
          "KV damaged on its way into decode's cache (the CPU face of a racing receive buffer)",
          f"{CONNECTOR}:CorruptOnLoad",
          f"{MUTANTS_SUITE}::test_kv_damaged_on_its_way_into_decode_is_caught_as_divergence[CorruptOnLoad]"),
    Entry("IgnoreLocalHit", "decode-side prefix hits", "#52617",
          "decode's prefix-cache hit ignored: the blocks after it get prefill's blocks from the start",
          f"{CONNECTOR}:IgnoreLocalHit", f"{BATTERY}[ignore-local-hit]"),
    Entry("HoldAbortedPrefill", "leaks on abort", "#46283",
          "a prompt aborted mid-prefill is held as if its KV were being sent: its blocks are never freed",
          f"{CONNECTOR}:HoldAbortedPrefill", f"{BATTERY}[hold-aborted-prefill]"),
    Entry("PullPerChild", "n > 1 through PD", "",
          "each child of an n>1 request pulls the transfer key prefill serves once: every child but one fails",
          f"{CONNECTOR}:PullPerChild", f"{BATTERY}[pull-per-child]"),
    Entry("ServeReplays", "lease expiry", "aws-do-eks #84",
          "a consumed transfer key is served again from the blocks its request had, reused since by other prompts",
          f"{CONNECTOR}:ServeReplays", f"{BATTERY}[serve-replays]"),
    Entry("LastBlockFailed", "recovery path", "#49250",
          "a failed load reports only its last block: with the recompute policy, decode keeps blocks never written",
          f"{CONNECTOR}:LastBlockFailed", f"{BATTERY}[last-block-failed]"),
    Entry("NoRedial", "peer restart", "SGLang #36029, NIXL #1905",
          "decode reuses its data connection to a prefill restarted on the same address: the next load fails",
          f"{CONNECTOR}:NoRedial", f"{BATTERY}[no-redial]"),
    Entry("ReshapeToFit", "P/D asymmetry", "#42895",
          "KV of another block size is reshaped into decode's blocks instead of refused",
          f"{CONNECTOR}:ReshapeToFit", f"{BATTERY}[reshape-to-fit]"),
    Entry("PartialLoad", "silent fallback", "#26896, #42703",
          "the prompt's last block is left for decode to recompute: right tokens, part of the transfer untested",
          f"{CONNECTOR}:PartialLoad", f"{BATTERY}[partial-load]"),
    Entry("NixlCrossedLoads", "KV to the wrong request in a shared step", "",
          "NixlConnector: two requests loaded in one decode step get each other's local blocks",
          "pdcheck.mutants.nixl:NixlCrossedLoads", f"{BATTERY}[nixl-crossed-loads]"),
    Entry("NixlNoLease", "leaks on abort", "#46283",
          "NixlConnector whose lease on unclaimed KV never runs out: an abandoned request's blocks stay held",
          "pdcheck.mutants.nixl:NixlNoLease", f"{BATTERY}[nixl-no-lease]"),
    Entry("CrossedLoadsConnector", "KV to the wrong request in a shared step", "",
          "ExampleConnector: two requests loaded in one decode step get each other's slots",
          "pdcheck.mutants.controls:CrossedLoadsConnector", f"{BATTERY}[example-crossed-loads]"),
    Entry("guessed_extract", "layout misread", "#23536",
          "KV layout guessed from the shape: a 2-block FlashAttention cache read as FlashInfer",
          "pdcheck.mutants.layouts:guessed_extract",
          f"{MUTANTS_SUITE}::test_layout_guessed_from_shape_misreads_a_two_block_flash_attention_cache"),
    Entry("slot_reshape_extract", "layout misread", "#23536",
          "FlashInfer cache read through a FlashAttention-style slot reshape",
          "pdcheck.mutants.layouts:slot_reshape_extract",
          f"{MUTANTS_SUITE}::test_flash_infer_read_through_a_flash_attention_slot_view_is_caught"),
    Entry("PerturbBlockConnector-block", "harness rot", "#28661",
          "one loaded KV block replaced with noise (the checker's negative control)",
          "pdcheck.mutants.controls:PerturbBlockConnector",
          f"{CONTROLS}::test_damaged_kv_block_is_reported_diverged_at_that_request[block]"),
    Entry("PerturbBlockConnector-element", "harness rot", "#28661",
          "one loaded KV element nudged by 1e-2, visible only in logprobs",
          "pdcheck.mutants.controls:PerturbBlockConnector",
          f"{CONTROLS}::test_damaged_kv_block_is_reported_diverged_at_that_request[element]"),
    Entry("LoadNothingConnector", "silent fallback", "#26896, #27083, #42703",
          "decode loads nothing and recomputes: right tokens, transfer never tested",
          "pdcheck.mutants.controls:LoadNothingConnector",
          f"{CONTROLS}::test_connector_that_loads_nothing_is_reported_as_fallback"),
    Entry("NeverReleaseConnector", "leaks on abort", "#46283",
          "prefill never reports a send finished, so its blocks are never reclaimed",
          "pdcheck.mutants.controls:NeverReleaseConnector",
          "suites/test_reference_connector.py::test_blocks_never_released_are_reported_as_a_leak"),
    Entry("ReinsertOnHeartbeat", "uneven polling", "#21819",
          "registry re-inserts an instance on every heartbeat, skewing round-robin",
          "pdcheck.mutants.proxy:ReinsertOnHeartbeat", f"{ROUTING}::test_reinsert_on_heartbeat_mutant_is_caught"),
    Entry("ExpireStopsAtFirstLive", "stale instances", "#20906 era",
          "expiry stops at the first live entry, so an expired one behind it stays routable",
          "pdcheck.mutants.proxy:ExpireStopsAtFirstLive",
          f"{ROUTING}::test_expiry_that_stops_at_the_first_live_entry_is_caught"),
    Entry("TokensSlicedRemainder", "MoE chunk remainder", "#13693",
          "the last MoE chunk's activation buffer sliced by tokens, not tokens x top_k",
          "pdcheck.mutants.moe:TokensSlicedRemainder",
          "suites/test_moe_shapes.py::test_mutant_is_caught_exactly_when_a_remainder_follows_a_full_chunk[9-2-True]"),
    Entry("RecvOnOtherStream", "garbled output, CUDA streams", "#20263",
          "NCCL receive buffer allocated on another stream than the receive",
          "pdcheck.mutants.gpu:RecvOnOtherStream",
          "tests/test_stream_races.py::test_stream_mutant_is_caught_by_the_block_checksum_in_its_race[RecvOnOtherStream]",
          Tier.GPU),
    Entry("SendBeforeKVWrite", "send before the layer's KV is written", "#26205",
          "NCCL send not ordered after the compute stream's KV write", "pdcheck.mutants.gpu:SendBeforeKVWrite",
          "tests/test_stream_races.py::test_stream_mutant_is_caught_by_the_block_checksum_in_its_race[SendBeforeKVWrite]",
          Tier.GPU),
)

# What the mutant modules of pdcheck/mutants/ define beside the mutants: their halves, bases,
# registries, and the correct code some mutants are caught beside. Everything else they define
# must have an entry (suites/test_mutants.py checks).
NOT_MUTANTS = frozenset({
    "EngineLocalKeyScheduler", "SkipMissingWorker", "CorruptOnLoadWorker", "LiveReadWorker", "LiveRead",
    "DeferredExtractionWorker", "FreeBeforeSendWorker", "DropFirstPushWorker", "DropFirstPush",
    "NoReceiveDeadlineWorker", "MutantPeer", "MUTANTS", "PromptKeyScheduler", "UnboundedFetchWorker",
    "KeepUnpulledWorker", "FOREVER_S", "IgnoreLocalHitScheduler",
    "HoldAbortedPrefillScheduler",
    "PartialLoadScheduler", "PullEveryLoadScheduler", "ReplayingOutbox", "ServeReplaysWorker",
    "LastBlockFailedWorker", "NoRedialClient", "NoRedialWorker",
    "ReshapeToFitWorker",
})


def by_name(names: list[str] | None) -> list[Entry]:
    """The entries named (all when `names` is empty); BadInput naming an unknown one."""
    if not names:
        return list(CATALOGUE)
    known = {e.name: e for e in CATALOGUE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInput(f"--only {', '.join(unknown)}: not in the catalogue (known: {', '.join(known)})")
    return [known[n] for n in names]

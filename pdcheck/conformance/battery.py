"""What every battery test does: requests through a deployment of the connector under test,
judged against the oracle, drained past the connector's own hold or lease, and a failure
message that ends with the line replaying the test."""

from __future__ import annotations

import dataclasses
import json
import random
import shlex

from pdcheck.config import EngineSpec
from pdcheck.gate import run_config
from pdcheck.report.terminal import failure_line
from pdcheck.repro.command import connector_options
from pdcheck.types import Checked, ConfigResult, GenRequest, Outcome, Planned
from pdcheck.workload.boundary import FIRST_ORDINARY_TOKEN

SEED, MAX_TOKENS = 0, 16
DEADLINE_S = 30.0  # per batch: a hanging connector costs this, then its instance is restarted
DRAIN_S = 10.0


@dataclasses.dataclass(frozen=True)
class Run:
    checked: tuple[Checked, ...]
    leaked: tuple[str, ...]

    @classmethod
    def of(cls, result: ConfigResult) -> Run:
        return cls(result.requests, result.leaks)

    def failures(self, allowed: tuple[Outcome, ...] = (Outcome.MATCH,),
                 when_faulted: tuple[Outcome, ...] | None = None) -> list[str]:
        """A line per request that ended outside `allowed` (`when_faulted`, if given, for the
        requests of a faulted batch; a known defect shown as recorded passes) or is still held
        after the drain, and one per instance still holding."""
        def ok(c: Checked) -> bool:
            outcomes = when_faulted if c.faulted and when_faulted is not None else allowed
            return c.counted == "known" or (not c.known_defect and c.verdict.outcome in outcomes)

        bad = [failure_line(c) for c in self.checked if c.leak or not ok(c)]
        return bad + [f"leak after drain: {leak}" for leak in self.leaked]


def run(pool, history, spec: EngineSpec, requests: list[GenRequest], concurrency: int = 1,
        decode_spec: EngineSpec | None = None, topology: tuple[int, int] = (1, 1),
        faults: list[Planned] = ()) -> Run:
    """`requests` through the pooled deployment for these settings, `concurrency` at a time,
    with `faults` injected by batch; then every instance drained."""
    deployment, oracle = pool.get(spec, decode_spec, *topology)
    return Run.of(run_config(deployment, requests, history, oracle=oracle, concurrency=concurrency, faults=faults,
                             deadline_s=DEADLINE_S, drain_s=drain_s(spec)))


def drain_s(spec: EngineSpec) -> float:
    """Long enough for the connector to let go of what it holds for nobody (its hold or lease)."""
    return max(DRAIN_S, spec.connector.profile.lease_s + 5.0)


def prompts(spec: EngineSpec, lengths: list[int], tag: str, seed: int = SEED, max_tokens: int = MAX_TOKENS,
            ) -> list[GenRequest]:
    """Distinct seeded prompts of these lengths, ids `<tag>-<i>-len<n>`."""
    vocab = json.loads((spec.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(f"{seed}-{tag}")
    return [GenRequest(request_id=f"{tag}-{i}-len{n}", prompt=[rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(n)],
                       max_tokens=max_tokens) for i, n in enumerate(lengths)]


def loaded_fully(run: Run, spec: EngineSpec) -> list[Checked]:
    """The requests that loaded at least what the profile expects."""
    profile = spec.connector.profile
    return [c for c in run.checked if c.external_tokens >= profile.expected_tokens(c.prompt_len, spec.block_size)]


def replay_line(request, spec: EngineSpec) -> str:
    """The command that reruns this test with the same connector, config, profile, model and dtype."""
    connector = spec.connector
    parts = ["pdcheck", "test", "--connector", connector.name]
    parts += connector_options(connector) + ["--model", str(spec.model), "--dtype", spec.dtype, "--", "-k", request.node.name]
    return "replay: " + shlex.join(parts)


def verdict(run: Run, request, spec: EngineSpec, allowed: tuple[Outcome, ...] = (Outcome.MATCH,),
            when_faulted: tuple[Outcome, ...] | None = None) -> str:
    """The failure message for `run` (empty when it passed), ending with the replay line."""
    bad = run.failures(allowed, when_faulted)
    return "\n".join([*bad, replay_line(request, spec)]) if bad else ""

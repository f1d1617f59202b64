"""One configuration under the gate: `run_config` is the one way to run it.

`run_config(cluster, requests, history, ...)` calibrates the oracle, sends the requests through
the cluster's client `concurrency` at a time (one batch per leg), judges each against the
oracle and injects each batch's planned fault when due. Every fault it injected is healed
whatever happens (a harness error still propagates, after the heal); after the workload it
restarts what died and drains every instance. It returns an immutable ConfigResult: each
request's verdict in the order sent, with a request an instance still holds after the drain
classed a leak, and the instances that still hold anything. A faulted request may end as a clean
error or a recompute, never diverge, hang or leak. Every request and verdict is written to the
history as it happens (one completion line per request; the drain's findings as notes).
"""

from __future__ import annotations

import dataclasses
import functools

import msgspec

from pdcheck.checker.compare import judge
from pdcheck.checker.oracle import Oracle
from pdcheck.client import Client
from pdcheck.cluster import Cluster
from pdcheck.errors import BadInput, InstanceFailed
from pdcheck.faults.process import Nemesis
from pdcheck.history import Completion, Fail, History, Info, Invoke, Note, Ok
from pdcheck.known_defects import KnownDefect, known_defect
from pdcheck.profiles import Profile
from pdcheck.types import Calibration, Checked, ConfigResult, GenRequest, GenResult, Outcome, PDResult, Planned, Verdict

DEADLINE_S = 60.0
DRAIN_S = 10.0


def run_config(cluster: Cluster, requests: list[GenRequest], history: History, *, oracle: Oracle | None = None,
               client: Client | None = None, concurrency: int = 1, faults: list[Planned] = (),
               deadline_s: float = DEADLINE_S, drain_s: float = DRAIN_S, config: str | None = None,
               expect: Expect | None = None, on_result=None) -> ConfigResult:
    """`requests` through a started cluster (by its own client unless `client` is given), judged,
    then healed, revived and drained (see the module docstring). `config` names the
    configuration in the history and results (default: the spec's label); `expect` what a request
    is held to beyond the oracle's tokens (default: the spec's connector profile)."""
    config = config or cluster.spec.label
    client = client or cluster.client()
    if faults and client.pair(0) is None:
        raise BadInput(f"{config}: faults are injected on the pair a batch goes to; this client does not pick it")
    nemesis = Nemesis(list(faults), history) if faults else None
    try:
        calibration, checked = judged(cluster, client, requests, history, config,
                                      oracle or Oracle(cluster.oracle), expect or Expect.of(cluster.spec), concurrency,
                                      nemesis, deadline_s, on_result)
    finally:
        if nemesis:
            nemesis.heal_all()
    cluster.revive()  # an instance killed by a fault or for a hang: the drain asks a fresh one
    leaked, held = drain(cluster, history, config, drain_s)
    checked = [charged(c, held) for c in checked]
    return ConfigResult(config, calibration, tuple(checked), tuple(leaked), tuple(faults))


def judged(cluster: Cluster, client: Client, requests: list[GenRequest], history: History, config: str,
           oracle: Oracle, expect: Expect, concurrency: int, nemesis: Nemesis | None, deadline_s: float,
           on_result) -> tuple[Calibration, list[Checked]]:
    calibration = oracle.calibration or oracle.calibrate(requests)
    history.record(Note(config=config, calibration=calibration))
    expected = {r.request_id: e for r, e in zip(requests, oracle.results(requests))}
    checked = []
    earlier: list[int] = []
    for start in range(0, len(requests), concurrency):
        batch = requests[start : start + concurrency]
        index = start // concurrency
        pair = client.pair(index)  # None where a proxy picks each request's pair: the history cannot name it
        lane = {"prefill": pair[0].name, "decode": pair[1].name} if pair else {}
        for request in batch:
            history.record(Invoke(config=config, request_id=request.request_id, prompt_len=len(request.prompt),
                                  topology=cluster.topology, **lane))
        between = None
        if nemesis:
            nemesis.due(index, "start", *pair)
            between = functools.partial(nemesis.due, index, "between", *pair)
        results = by_request(batch, client.send(batch, index, deadline_s, between))
        transfers = cluster.transfers()
        for request, pd in results:
            before = earlier + [len(r.prompt) for r in batch if r.arrive_step < request.arrive_step]
            item = judge_one(expect, request, pd, expected[request.request_id], calibration, before, oracle, config)
            item = msgspec.structs.replace(
                item, transfer=transfers.get((pd.prefill.kv_transfer_params or {}).get("transfer_key")),
                faulted=bool(nemesis and nemesis.faulted(index)))
            history.record(completion(item.verdict.outcome)(
                config=config, request_id=request.request_id, verdict=item.verdict,
                external_tokens=item.external_tokens, known_defect=item.known_defect, transfer=item.transfer,
                faulted=item.faulted, tokens=pd.result.token_ids, expected=expected[request.request_id].token_ids))
            checked.append(item)
            if on_result:
                on_result(item)
        earlier += [len(r.prompt) for r in batch]  # within a batch, only an earlier arrival is before
    return calibration, checked


def by_request(sent: list[GenRequest], results: list[PDResult]) -> list[tuple[GenRequest, PDResult]]:
    """Each request sent with its own result, matched by id: a result for a request that was not
    sent, or a request with no result, is a harness error, never judged against another's."""
    found = {pd.result.request_id: pd for pd in results}
    if len(found) != len(results) or set(found) != {r.request_id for r in sent}:
        raise InstanceFailed(f"results for {sorted(found)} do not answer requests {[r.request_id for r in sent]}")
    return [(request, found[request.request_id]) for request in sent]


def drain(cluster: Cluster, history: History, config: str, timeout_s: float) -> tuple[list[str], dict[str, str]]:
    """Each instance the cluster owns, drained: those still holding KV blocks or requests (a line
    each), and each request still held with the instance holding it. Written as notes."""
    leaked, held = [], {}
    for instance in cluster.instances:
        state = instance.drain(timeout_s)
        history.record(Note(config=config, instance=instance.name, drained=state))
        if state is None or not state.idle:
            leaked.append(f"{instance.name}: {state or 'not running'}")
        for request_id in state.held if state is not None else ():
            held.setdefault(request_id, instance.name)
    return leaked, held


def charged(item: Checked, held: dict[str, str]) -> Checked:
    """`item` classed a leak if an instance still held its request after the drain."""
    where = held.get(item.verdict.request_id)
    if where is None:
        return item
    return msgspec.structs.replace(item, leak=f"{where} still holds it after the drain")


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a request is held to beyond the oracle's tokens: the prompt tokens decode should load
    through the connector, and the known defect its connector's lineage may show."""

    block_size: int
    profile: Profile | None = None  # None (a deployment from outside): any load at all
    lineage: tuple[str, ...] = ()
    loads: bool = True  # False: nothing is due (prompts a single instance has not seen before)
    follow_ties: bool = True  # judge past a near-tie against the oracle's continuation (more oracle requests)

    @classmethod
    def of(cls, spec) -> Expect:
        return cls(spec.block_size, spec.connector.profile, spec.connector.lineage)

    def external(self, prompt_len: int) -> int:
        """0 for a prompt of one block or less (or where nothing is due); else the profile's
        count, 1 without a profile."""
        if not self.loads or prompt_len <= self.block_size:
            return 0
        return 1 if self.profile is None else self.profile.expected_tokens(prompt_len, self.block_size)

    def defect(self, prompt_len: int, earlier: list[int]) -> KnownDefect | None:
        return known_defect(self.lineage, prompt_len, self.block_size, earlier)


def judge_one(expect: Expect, request: GenRequest, pd: PDResult, expected, calibration: Calibration, earlier,
              oracle: Oracle | None = None, config: str = "") -> Checked:
    """One request's verdict; with `oracle`, near-ties are judged past (see judge_after_ties).
    A load is claimed missing only where the answer reports its cached tokens."""
    prompt_len = len(request.prompt)
    due = max(0, expect.external(prompt_len) - pd.local_tokens) if pd.result.cached_tokens_reported else 0
    verdict = judge(expected, pd.result, calibration.rule, calibration.tolerance, pd.external_tokens, due)
    if oracle is not None and expect.follow_ties:
        verdict = judge_after_ties(oracle, request, pd.result, verdict, calibration)
    defect = expect.defect(prompt_len, earlier)
    counted = "known" if defect and defect.shows(verdict) else verdict.outcome.value
    return Checked(
        config=config, prompt_len=prompt_len, verdict=verdict, external_tokens=pd.external_tokens,
        local_tokens=pd.local_tokens, known_defect=defect.name if defect else None, counted=counted,
    )


def completion(outcome: Outcome) -> type[Completion]:
    """A match is Ok; a hang Info (cut off: outcome unknown); anything else Fail."""
    return {Outcome.MATCH: Ok, Outcome.HANG: Info}.get(outcome, Fail)


def judge_after_ties(oracle: Oracle, request: GenRequest, pd_result: GenResult, verdict: Verdict,
                     calibration: Calibration) -> Verdict:
    """Past an accepted near-tie at p the two outputs continue from different prefixes, so PD's
    tokens after p are judged against the oracle continuing from PD's tokens up to p, and so on
    for each further tie. A later divergence is `diverged` at its position in the whole output;
    otherwise `verdict` stands, noting the later ties."""
    judged, ties, max_diff = verdict, [], verdict.max_logprob_diff
    while judged.tie_at is not None and judged.tie_at < len(pd_result.token_ids) - 1:
        cut = judged.tie_at + 1
        expected = spliced(pd_result, cut, oracle.continuation(request, pd_result.token_ids[:cut]))
        judged = judge(expected, pd_result, calibration.rule, calibration.tolerance, 0, 0)
        max_diff = max(max_diff, judged.max_logprob_diff)
        if judged.outcome is not Outcome.MATCH:
            detail = f"{judged.detail} (past the near-tie at token {cut - 1}, judged against the oracle continuing " \
                     f"from PD's tokens)"
            return msgspec.structs.replace(judged, max_logprob_diff=max_diff, detail=detail)
        ties += [] if judged.tie_at is None else [judged.tie_at]
    if not ties:
        return msgspec.structs.replace(verdict, max_logprob_diff=max_diff)
    return msgspec.structs.replace(verdict, tie_at=ties[-1], max_logprob_diff=max_diff,
                                   detail=f"{verdict.detail}, then at token{'s' * (len(ties) > 1)} "
                                          f"{', '.join(map(str, ties))}")


def spliced(pd_result: GenResult, cut: int, continuation: GenResult) -> GenResult:
    """The oracle's output as if it had produced PD's first `cut` tokens, then `continuation`."""
    return msgspec.structs.replace(
        continuation,
        token_ids=pd_result.token_ids[:cut] + continuation.token_ids,
        logprobs=pd_result.logprobs[:cut] + continuation.logprobs,
        top_logprobs=pd_result.top_logprobs[:cut] + continuation.top_logprobs,
    )

"""One configuration under the gate: oracle calibration, the PD path for each request, verdicts.

`check` drives a started Deployment with a list of requests, writes every request and verdict
to the history, and returns the verdicts in request order. With a Nemesis, each batch's planned
fault is injected when due (and healed on its timer); a faulted request may end as a clean
error or a recompute, never diverge or hang. Requests go through the PD path
`concurrency` at a time (one batch per leg).
"""

from __future__ import annotations

import functools

import msgspec

from pdcheck.checker.compare import judge
from pdcheck.checker.oracle import Oracle
from pdcheck.client.legs import PDResult
from pdcheck.cluster.deployment import Deployment
from pdcheck.errors import InstanceFailed
from pdcheck.history import History
from pdcheck.known_defects import known_defect
from pdcheck.faults.process import Nemesis
from pdcheck.types import Calibration, Checked, GenRequest, GenResult, Outcome, Verdict

DEADLINE_S = 60.0


def check(
    deployment: Deployment,
    requests: list[GenRequest],
    history: History,
    oracle: Oracle | None = None,
    concurrency: int = 1,
    on_result=None,
    nemesis: Nemesis | None = None,
    deadline_s: float = DEADLINE_S,
) -> tuple[Calibration, list[Checked]]:
    spec = deployment.spec
    oracle = oracle or Oracle(deployment.oracle)
    calibration = oracle.calibration or oracle.calibrate(requests)
    history.record("note", config=spec.label, calibration=calibration)
    expected = {r.request_id: e for r, e in zip(requests, oracle.results(requests))}
    checked = []
    earlier: list[int] = []
    for start in range(0, len(requests), concurrency):
        batch = requests[start : start + concurrency]
        index = start // concurrency
        # a served cluster's proxy picks each request's pair itself: there the history cannot name it
        pair = deployment.pair(index) if hasattr(deployment, "pair") else None
        lane = {"prefill": pair[0].name, "decode": pair[1].name} if pair else {}
        for request in batch:
            history.record("invoke", config=spec.label, request_id=request.request_id, prompt_len=len(request.prompt),
                           topology=deployment.topology, **lane)
        between = None
        if nemesis:
            nemesis.due(index, "start", *pair)
            between = functools.partial(nemesis.due, index, "between", *pair)
        results = by_request(batch, deployment.run(batch, index, deadline_s, between))
        transfers = deployment.transfers()
        for request, pd in results:
            before = earlier + [len(r.prompt) for r in batch if r.arrive_step < request.arrive_step]
            item = judge_one(spec, request, pd, expected[request.request_id], calibration, before, oracle)
            item.transfer = transfers.get((pd.prefill.kv_transfer_params or {}).get("transfer_key"))
            item.faulted = bool(nemesis and nemesis.faulted(index))
            history.record(completion_kind(item.verdict.outcome), config=spec.label, request_id=request.request_id,
                           verdict=item.verdict, external_tokens=item.external_tokens, known_defect=item.known_defect,
                           transfer=item.transfer, faulted=item.faulted, tokens=pd.result.token_ids,
                           expected=expected[request.request_id].token_ids)
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


def leaks(deployment: Deployment, history: History, timeout_s: float = 10.0,
          checked: list[Checked] = ()) -> list[str]:
    """Instances that still hold KV blocks or requests after the workload, once drained. Each
    of `checked` that an instance still holds is classed a leak (its `leak` says where), and
    written to the history as such."""
    found = []
    for instance in deployment.instances:
        state = instance.drain(timeout_s)
        history.record("note", config=deployment.spec.label, instance=instance.name, drained=state)
        if state is None or not state.idle:
            found.append(f"{instance.name}: {state or 'not running'}")
        for item in checked:
            if state is not None and item.verdict.request_id in state.held:
                item.leak = f"{instance.name} still holds it after the drain"
                item.counted = "leak"
                history.record("fail", config=item.config, request_id=item.verdict.request_id, leak=item.leak)
    return found


def judge_one(spec, request: GenRequest, pd: PDResult, expected, calibration: Calibration, earlier,
              oracle: Oracle | None = None) -> Checked:
    """One request's verdict; with `oracle`, near-ties are judged past (see judge_after_ties)."""
    prompt_len = len(request.prompt)
    verdict = judge(expected, pd.result, calibration.rule, calibration.tolerance, pd.external_tokens,
                    max(0, expected_external(spec, prompt_len) - pd.local_tokens))
    if oracle is not None:
        verdict = judge_after_ties(oracle, request, pd.result, verdict, calibration)
    defect = known_defect(spec.connector.lineage, prompt_len, spec.block_size, earlier)
    counted = "known" if defect and defect.shows(verdict) else verdict.outcome.value
    return Checked(
        config=spec.label, prompt_len=prompt_len, verdict=verdict, external_tokens=pd.external_tokens,
        local_tokens=pd.local_tokens, known_defect=defect.name if defect else None, counted=counted,
    )


def completion_kind(outcome: Outcome) -> str:
    return {Outcome.MATCH: "ok", Outcome.HANG: "info"}.get(outcome, "fail")


def expected_external(spec, prompt_len: int) -> int:
    """The prompt tokens decode should load through the connector: its profile's count for a
    prompt longer than one block; none for a shorter one."""
    if prompt_len <= spec.block_size:
        return 0
    return spec.connector.profile.expected_tokens(prompt_len, spec.block_size)


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

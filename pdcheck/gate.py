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

from pdcheck.checker.compare import Outcome, Verdict, judge
from pdcheck.checker.oracle import Calibration, Oracle
from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.messages import GenRequest
from pdcheck.connector.stats import Transfer
from pdcheck.history import History
from pdcheck.known_defects import known_defect
from pdcheck.nemesis.schedule import Nemesis
from pdcheck.pd import PDResult

DEADLINE_S = 60.0


class Checked(msgspec.Struct):
    """A request's verdict with what it needs for reports and replay."""

    config: str
    prompt_len: int
    verdict: Verdict
    external_tokens: int
    known_defect: str | None = None
    counted: str = ""  # the summary column: the outcome, or `known` for a known defect as recorded
    transfer: Transfer | None = None  # what the connector's transfer log says moved, if it keeps one
    faulted: bool = False  # a fault hit its batch: a clean error (or a recompute) is then allowed
    leak: str | None = None  # an instance still held the request after the drain (see `leaks`)

    @property
    def outcome(self) -> str:
        """The class the request ends in: its verdict's outcome, or `leak`."""
        return "leak" if self.leak else self.verdict.outcome.value

    @property
    def passed(self) -> bool:
        """Matched with no known defect expected, or showed a known defect as recorded; never
        a request still held after the drain."""
        if self.leak:
            return False
        if self.known_defect:
            return self.counted == "known"
        if self.faulted:
            return self.verdict.outcome in (Outcome.MATCH, Outcome.ERROR, Outcome.FALLBACK)
        return self.verdict.outcome is Outcome.MATCH


def check(
    deployment: Deployment,
    requests: list[GenRequest],
    history: History,
    oracle: Oracle | None = None,
    concurrency: int = 1,
    on_result=None,
    nemesis: Nemesis | None = None,
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
        results = deployment.run(batch, index, DEADLINE_S, between)
        transfers = deployment.transfers()
        for request, pd in zip(batch, results):
            item = judge_one(spec, request, pd, expected[request.request_id], calibration, earlier)
            item.transfer = transfers.get((pd.prefill.kv_transfer_params or {}).get("transfer_key"))
            item.faulted = bool(nemesis and nemesis.faulted(index))
            earlier.append(len(request.prompt))
            history.record(completion_kind(item.verdict.outcome), config=spec.label, request_id=request.request_id,
                           verdict=item.verdict, external_tokens=item.external_tokens, known_defect=item.known_defect,
                           transfer=item.transfer, faulted=item.faulted, tokens=pd.result.token_ids,
                           expected=expected[request.request_id].token_ids)
            checked.append(item)
            if on_result:
                on_result(item)
    return calibration, checked


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


def judge_one(spec, request: GenRequest, pd: PDResult, expected, calibration: Calibration, earlier) -> Checked:
    verdict = judge(
        expected, pd.result, calibration.rule, calibration.tolerance, pd.external_tokens,
        expects_transfer=len(request.prompt) > spec.block_size,
    )
    defect = known_defect(spec.connector.class_name, len(request.prompt), spec.block_size, earlier)
    counted = "known" if defect and verdict.outcome is defect.outcome else verdict.outcome.value
    return Checked(
        config=spec.label, prompt_len=len(request.prompt), verdict=verdict, external_tokens=pd.external_tokens,
        known_defect=defect.name if defect else None, counted=counted,
    )


def completion_kind(outcome: Outcome) -> str:
    return {Outcome.MATCH: "ok", Outcome.HANG: "info"}.get(outcome, "fail")

"""`pdcheck run --target URL --oracle URL`: the gate against a deployment pdcheck did not start.

Before any load: both endpoints must answer /v1/models as OpenAI-compatible servers serving the
same model, prompts are made of the target's token ids (its /tokenize, or --tokenizer), and the
whole plan must fit the request budget. Then: the oracle is calibrated, each workload phase
goes to the oracle and the target and is judged request by request, the API cases (n > 1 with
a seed, sampling options, logprobs, stop strings, chat: pdcheck.workload.api) go to both and are
compared field by field, the client faults run (an aborted stream, a dropped connection, two
prompts under one request id), a probe shows the target still serves, and the servers' metrics (--metrics) say whether anything leaked.
Hooks run at their requests, and every heal runs by the end. Same run folder, verdicts, exit
codes as a local run.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from rich.console import Console

from pdcheck.blackbox.endpoint import Budget, Endpoint, engine_states, local_token_pool
from pdcheck.checker import api
from pdcheck.checker.compare import judge
from pdcheck.checker.oracle import Oracle
from pdcheck.errors import BadInput
from pdcheck.faults.client import faults_on
from pdcheck.faults.hooks import Hook, Hooks
from pdcheck.gate import completion_kind
from pdcheck.report import terminal as report
from pdcheck.report.html import write_report
from pdcheck.store import RunStore
from pdcheck.types import Calibration, Checked, GenRequest, GenResult, Outcome, Verdict
from pdcheck.workload.api import api_cases, case_names, probe
from pdcheck.workload.phases import Phase, phases

DEADLINE_S = 120.0
FAULT_REQUESTS = 5  # target: abort, disconnect, two with one id, the probe


def run_blackbox(args, stack: ExitStack, console: Console) -> int:
    if not (args.target and args.oracle):
        raise BadInput("black-box mode needs both --target and --oracle")
    hooks = [Hook.parse(h, False) for h in args.hook or []] + [Hook.parse(h, True) for h in args.heal or []]
    budget = Budget(args.max_requests, args.rate)
    model = (args.model or [""])[0]
    target = Endpoint("target", args.target.rstrip("/"), budget, model)
    oracle = Endpoint("oracle", args.oracle.rstrip("/"), budget, model)
    target.model = oracle.model = same_model(target, oracle)
    pool = local_token_pool(args.tokenizer) if args.tokenizer else token_pool(target, oracle)
    max_model_len = min(n for n in (target.max_model_len, oracle.max_model_len, args.max_model_len) if n)
    plan = phases(pool, args.seed, args.block_size, max_model_len, args.max_tokens)
    cost = planned_cost(plan)
    print_plan(console, target, oracle, plan, hooks, cost, args)
    if cost > args.max_requests:
        raise BadInput(f"the plan needs {cost} requests, over the budget of {args.max_requests} (--max-requests)")
    if args.dry_run:
        return 0
    store = RunStore(args.runs_dir)
    stack.callback(store.close)
    schedule = Hooks(hooks, store.history)
    stack.callback(schedule.heal_all)
    console.print(f"run folder: {store.folder}")
    return judge_run(args, store, console, target, Oracle(oracle, DEADLINE_S), plan, schedule)


def same_model(target: Endpoint, oracle: Endpoint) -> str:
    served, baseline = target.probe(), oracle.probe()
    if target.model:
        return target.model
    common = sorted(set(served) & set(baseline))
    if len(common) != 1:
        raise BadInput(f"the target serves {served} and the oracle {baseline}: name the one model to compare "
                       f"with --model" if common else f"the target serves {served}, the oracle {baseline}: no model in common")
    return common[0]


def token_pool(target: Endpoint, oracle: Endpoint) -> list[int]:
    """The model's token ids from the target's /tokenize, else the oracle's (same model): a
    proxy in front of the target may not pass /tokenize on."""
    try:
        return target.token_pool()
    except BadInput:
        return oracle.token_pool()


def planned_cost(plan: list[Phase]) -> int:
    """Completions the run sends, both endpoints: every request to the target, each distinct
    prompt once to the oracle, calibration (the boundary phase again, one at a time), faults."""
    requests = [r for phase in plan for r in phase.requests]
    distinct = {(tuple(r.prompt), r.max_tokens) for r in requests}
    api_requests = 1 + 2 * len(case_names())  # the probe to the oracle, each case to both
    return len(requests) + len(distinct) + len(plan[0].requests) + FAULT_REQUESTS + 2 + api_requests


def print_plan(console, target, oracle, plan, hooks, cost, args) -> None:
    console.print(f"target {target.url}, oracle {oracle.url}, model {target.model}, block size {args.block_size}, "
                  f"budget {args.max_requests} requests at most {args.rate}/s", markup=False)
    for phase in plan:
        lengths = sorted({len(r.prompt) for r in phase.requests})
        how = ("at once" if phase.concurrent else "one at a time") + (", streamed" if phase.stream else "")
        console.print(f"  {phase.name}: {len(phase.requests)} requests {how}, prompt lengths {lengths}", markup=False)
    console.print("  client faults: an aborted stream, a dropped connection, two prompts under one request id",
                  markup=False)
    for hook in hooks:
        console.print(f"  {'heal' if hook.heal else 'hook'} before request {hook.at}: {hook.command}", markup=False)
    console.print(f"  {cost} requests in all", markup=False)


def judge_run(args, store, console, target, oracle: Oracle, plan, hooks) -> int:
    history = store.history
    before = engine_states(args.metrics or [])
    calibration = oracle.calibrate(plan[0].requests)
    history.record("note", calibration=calibration, metrics_before=before)
    configs, index = [], 0
    for phase in plan:
        expected = oracle.results(phase.requests)
        results = send(target, phase, index, hooks, history)
        index += len(phase.requests)
        checked = [verdict(phase.name, r, got, exp, calibration, args.block_size, history)
                   for r, got, exp in zip(phase.requests, results, expected)]
        configs.append({"config": phase.name, "calibration": calibration, "requests": checked, "leaks": []})
    hooks.heal_all()
    configs.append(api_phase(target, oracle.instance, calibration, history))
    configs.append(client_faults(target, oracle, plan[0].requests, calibration, args.block_size, history))
    leaked, drained = drain_check(args.metrics or [], history)
    configs[-1].update(leaks=leaked, drained=drained)
    return finish(store, console, configs, leaked)


def send(target: Endpoint, phase: Phase, index: int, hooks: Hooks, history) -> list[GenResult]:
    for r in phase.requests:
        history.record("invoke", config=phase.name, request_id=r.request_id, prompt_len=len(r.prompt))
    if phase.concurrent:
        hooks.before(range(index, index + len(phase.requests)))
        return target.generate(phase.requests, DEADLINE_S, phase.stream)
    results = []
    for i, r in enumerate(phase.requests):
        hooks.before([index + i])
        results += target.generate([r], DEADLINE_S, phase.stream)
    return results


def verdict(config: str, request: GenRequest, got: GenResult, expected: GenResult, calibration: Calibration,
            block_size: int, history) -> Checked:
    """Judged as locally, except that a fallback is claimed only where the target reports its
    cached tokens (else the transfer is unknown, not failed)."""
    observable = got.cached_tokens_reported
    v = judge(expected, got, calibration.rule, calibration.tolerance, got.num_cached_tokens,
              expected_external=1 if observable and len(request.prompt) > block_size else 0)
    history.record(completion_kind(v.outcome), config=config, request_id=request.request_id, verdict=v,
                   external_tokens=got.num_cached_tokens if observable else None, tokens=got.token_ids)
    return Checked(config=config, prompt_len=len(request.prompt), verdict=v, external_tokens=got.num_cached_tokens,
                   counted=v.outcome.value)


def api_phase(target: Endpoint, oracle: Endpoint, calibration: Calibration, history) -> dict:
    """Each API case to the oracle and the target, the answers compared field by field (logprobs
    within the calibrated tolerance, at least api.FLOOR)."""
    oracle.budget.take()
    greedy = api.send(oracle.url, probe(oracle.model), DEADLINE_S)
    if "error" in greedy:
        raise BadInput(f"oracle {oracle.url} refused a plain completion: {greedy['error']}")
    checked = []
    for case in api_cases(oracle.model, greedy):
        history.record("invoke", config="api", request_id=f"api-{case.name}", body=case.body)
        target.budget.take(2)
        outcome, detail = api.compare(case, api.send(oracle.url, case, DEADLINE_S),
                                      api.send(target.url, case, DEADLINE_S), max(calibration.tolerance, api.FLOOR))
        v = Verdict(f"api-{case.name}", outcome, calibration.rule, detail=detail)
        history.record(completion_kind(outcome), config="api", request_id=v.request_id, verdict=v)
        checked.append(Checked(config="api", prompt_len=0, verdict=v, external_tokens=0, counted=outcome.value))
    return {"config": "api", "calibration": calibration, "requests": checked, "leaks": []}


def client_faults(target: Endpoint, oracle: Oracle, probes: list[GenRequest], calibration, block_size, history) -> dict:
    """Abort a stream, drop a connection, send two prompts under one id: then the target must
    still answer as the oracle does, and each of the two must get its own answer."""
    a, b = probes[len(probes) // 2], probes[-1]
    for fault in faults_on(target.url, target.model, a, history, "client-faults"):
        target.budget.take()
        fault.inject()
    twins = [GenRequest("duplicate-id", a.prompt, a.max_tokens), GenRequest("duplicate-id", b.prompt, b.max_tokens)]
    probe = GenRequest(f"probe-len{len(a.prompt)}", a.prompt, a.max_tokens)
    checked = []
    for batch in (twins, [probe]):
        for r in batch:
            history.record("invoke", config="client-faults", request_id=r.request_id, prompt_len=len(r.prompt))
        for r, got, exp in zip(batch, target.generate(batch, DEADLINE_S), oracle.results(batch)):
            checked.append(verdict("client-faults", r, got, exp, calibration, block_size, history))
    return {"config": "client-faults", "calibration": calibration, "requests": checked, "leaks": []}


def drain_check(urls: list[str], history, timeout_s: float = 10.0) -> tuple[list[str], str]:
    """Leaks seen in the servers' metrics after the run: a list, and the summary's word."""
    if not urls:
        return [], "unknown"
    end = time.monotonic() + timeout_s
    states = engine_states(urls)
    while any(s is not None and not s.idle for s in states.values()) and time.monotonic() < end:
        time.sleep(0.5)
        states = engine_states(urls)
    history.record("note", metrics_after=states)
    leaked = [f"{url}: {state}" for url, state in states.items() if state is not None and not state.idle]
    unknown = [url for url, state in states.items() if state is None]
    return leaked, "leak" if leaked else "unknown" if unknown else "clean"


def finish(store, console, configs: list[dict], leaked: list[str]) -> int:
    failures = [c for cfg in configs for c in cfg["requests"] if c.verdict.outcome is not Outcome.MATCH]
    verdict_ = "valid" if not failures and not leaked else "invalid"
    store.write_results({"verdict": verdict_, "configs": configs})
    report.print_summary(console, configs)
    for c in failures:
        console.print(report.failure_line(c), markup=False, highlight=False)
    for leak in leaked:
        console.print(f"leak after drain: {leak}", markup=False, highlight=False)
    console.print(f"verdict: {verdict_}   results: {store.folder / 'results.json'}", markup=False)
    console.print(f"report: {write_report(store.folder)}", markup=False)
    return 0 if verdict_ == "valid" else 1

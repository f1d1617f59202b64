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

import msgspec
from rich.console import Console

from pdcheck.blackbox.endpoint import Budget, Endpoint, RemoteTarget, engine_states, local_token_pool
from pdcheck.checker import api
from pdcheck.checker.oracle import Oracle
from pdcheck.errors import BadInput
from pdcheck.faults.client import faults_on
from pdcheck.faults.hooks import Hook, Hooks
from pdcheck.gate import Expect, completion, judge_one, run_config
from pdcheck.history import Invoke, Note
from pdcheck.report import terminal as report
from pdcheck.report.html import write_report
from pdcheck.store import RunStore
from pdcheck.types import Calibration, Checked, ConfigResult, GenRequest, PDResult, RunResults, Verdict
from pdcheck.workload.api import api_cases, case_names, probe
from pdcheck.workload.phases import Phase, phases

DEADLINE_S = 120.0
FAULT_REQUESTS = 5  # target: abort, disconnect, two with one id, the probe


def run_blackbox(args, stack: ExitStack, console: Console) -> int:
    if not (args.target and args.oracle):
        raise BadInput("black-box mode needs both --target and --oracle")
    if tuple(args.workload) != ("boundary",):
        raise BadInput("--workload chooses a local run's phases; black-box mode sends every phase (see --dry-run)")
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
    """Each phase through `run_config` (hooks at their requests; a fallback claimed only where the
    target reports cached tokens; no near-tie continuations, which the budget does not count),
    then the API cases and the client faults, then the servers' metrics."""
    history = store.history
    before = engine_states(args.metrics or [])
    calibration = oracle.calibrate(plan[0].requests)
    history.record(Note(calibration=calibration, metrics_before=before))
    remote = RemoteTarget(target, oracle.instance, hooks)
    expect = Expect(args.block_size, follow_ties=False)
    configs = [run_config(remote, phase.requests, history, oracle=oracle, client=remote.client(phase.stream),
                          concurrency=len(phase.requests) if phase.concurrent else 1, deadline_s=DEADLINE_S,
                          config=phase.name, expect=expect) for phase in plan]
    hooks.heal_all()
    configs.append(api_phase(target, oracle.instance, calibration, history))
    configs.append(client_faults(remote, oracle, plan[0].requests, history, expect))
    leaked, drained = drain_check(args.metrics or [], history)
    configs[-1] = msgspec.structs.replace(configs[-1], leaks=tuple(leaked), drained=drained)
    return finish(store, console, configs, leaked)


def api_phase(target: Endpoint, oracle: Endpoint, calibration: Calibration, history) -> ConfigResult:
    """Each API case to the oracle and the target, the answers compared field by field (logprobs
    within the calibrated tolerance, at least api.FLOOR)."""
    oracle.budget.take()
    greedy = api.send(oracle.url, probe(oracle.model), DEADLINE_S)
    if "error" in greedy:
        raise BadInput(f"oracle {oracle.url} refused a plain completion: {greedy['error']}")
    checked = []
    for case in api_cases(oracle.model, greedy):
        history.record(Invoke(config="api", request_id=f"api-{case.name}", body=case.body))
        target.budget.take(2)
        outcome, detail = api.compare(case, api.send(oracle.url, case, DEADLINE_S),
                                      api.send(target.url, case, DEADLINE_S), max(calibration.tolerance, api.FLOOR))
        v = Verdict(f"api-{case.name}", outcome, calibration.rule, detail=detail)
        history.record(completion(outcome)(config="api", request_id=v.request_id, verdict=v))
        checked.append(Checked(config="api", prompt_len=0, verdict=v, external_tokens=0, counted=outcome.value))
    return ConfigResult("api", calibration, tuple(checked))


def client_faults(remote: RemoteTarget, oracle: Oracle, probes: list[GenRequest], history,
                  expect: Expect) -> ConfigResult:
    """Abort a stream, drop a connection, send two prompts under one id: then the target must
    still answer as the oracle does, and each of the two must get its own answer."""
    target = remote.endpoint
    a, b = probes[len(probes) // 2], probes[-1]
    for fault in faults_on(target.url, target.model, a, history, "client-faults"):
        target.budget.take()
        fault.inject()
    twins = [GenRequest("duplicate-id", a.prompt, a.max_tokens), GenRequest("duplicate-id", b.prompt, b.max_tokens)]
    probe = GenRequest(f"probe-len{len(a.prompt)}", a.prompt, a.max_tokens)
    checked = [*sent_at_once(target, oracle, twins, history, expect),
               *sent_at_once(target, oracle, [probe], history, expect)]
    return ConfigResult("client-faults", oracle.calibration, tuple(checked))


def sent_at_once(target, oracle: Oracle, batch: list[GenRequest], history, expect: Expect,
                 config: str = "client-faults") -> list[Checked]:
    """`batch` to the target at once, each answer judged against the oracle's for its own prompt:
    by position, since two requests may share an id here (which `run_config` refuses)."""
    for r in batch:
        history.record(Invoke(config=config, request_id=r.request_id, prompt_len=len(r.prompt)))
    checked = []
    for r, got, exp in zip(batch, target.generate(batch, DEADLINE_S), oracle.results(batch)):
        checked.append(judge_one(expect, r, PDResult.served(got), exp, oracle.calibration, [], config=config))
        history.record(completion(checked[-1].verdict.outcome)(config=config, request_id=r.request_id,
                                                               verdict=checked[-1].verdict, tokens=got.token_ids))
    return checked


def drain_check(urls: list[str], history, timeout_s: float = 10.0) -> tuple[list[str], str]:
    """Leaks seen in the servers' metrics after the run: a list, and the summary's word."""
    if not urls:
        return [], "unknown"
    end = time.monotonic() + timeout_s
    states = engine_states(urls)
    while any(s is not None and not s.idle for s in states.values()) and time.monotonic() < end:
        time.sleep(0.5)
        states = engine_states(urls)
    history.record(Note(metrics_after=states))
    leaked = [f"{url}: {state}" for url, state in states.items() if state is not None and not state.idle]
    unknown = [url for url, state in states.items() if state is None]
    return leaked, "leak" if leaked else "unknown" if unknown else "clean"


def finish(store, console, configs: list[ConfigResult], leaked: list[str]) -> int:
    failures = [c for cfg in configs for c in cfg.failures]
    verdict_ = "valid" if not failures and not leaked else "invalid"
    store.write_results(RunResults(verdict_, tuple(configs)))
    report.print_summary(console, configs)
    for c in failures:
        console.print(report.failure_line(c), markup=False, highlight=False)
    for leak in leaked:
        console.print(f"leak after drain: {leak}", markup=False, highlight=False)
    console.print(f"verdict: {verdict_}   results: {store.folder / 'results.json'}", markup=False)
    console.print(f"report: {write_report(store.folder)}", markup=False)
    return 0 if verdict_ == "valid" else 1

"""`pdcheck run`: every configuration's deployment, the workload through it, a summary.

A deployment is xPyD in-process engines, or with --serve the real shape: `pdcheck serve`
instances (vLLM's OpenAI server) behind the PD proxy, the workload sent over HTTP.

Configurations run one after another; on CPU the next one's instances start while the current one
is checked, so at most two deployments are alive (on CUDA one: GPU memory is planned for one).
`--dry-run` prints where each instance would run and starts nothing. Every deployment is owned by the caller's
ExitStack, so an error or Ctrl-C anywhere still stops every instance.
"""

from __future__ import annotations

from contextlib import ExitStack

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdcheck.cluster.deployment import Deployment
from pdcheck.cluster.placement import Device, Layout, gpu_names
from pdcheck.config import DecodePrompt, EngineSpec
from pdcheck.errors import BadInput
from pdcheck.faults.process import plan
from pdcheck.gate import run_config
from pdcheck.report import terminal as report
from pdcheck.report.html import write_report
from pdcheck.repro.case import make_repro
from pdcheck.repro.case import write as write_repro
from pdcheck.repro.command import replay_command
from pdcheck.store import RunStore
from pdcheck.types import RunResults
from pdcheck.workload.phases import local_workload


def workload(args, spec: EngineSpec):
    requests = local_workload(spec, args.workload, args.seed, args.max_tokens)
    if args.lengths:
        requests = [r for r in requests if len(r.prompt) in args.lengths]
        if not requests:
            raise BadInput(f"--lengths {args.lengths}: no workload prompt has these lengths")
    return requests


def make_deployment(args, spec: EngineSpec, run_dir, name: str, layout: Layout):
    """In-process engines, or with --serve `pdcheck serve` instances behind the proxy; made, not started."""
    if not args.serve:
        return Deployment(spec, run_dir, name, None, *args.topology, layout=layout)
    if args.nemesis is not None:
        raise BadInput("--nemesis pauses in-process instances; it does not combine with --serve")
    from pdcheck.cluster.http_cluster import ServedCluster

    if spec.connector.decode_prompt is not DecodePrompt.ORIGINAL:
        raise BadInput(f"--serve: the proxy gives decode the original prompt; {spec.connector.name} "
                       f"expects it with prefill's first token (try --connector reference)")
    return ServedCluster(spec, run_dir / name, *args.topology, layout=layout)


def dry_run(args, specs: list[EngineSpec], layout: Layout, console: Console) -> int:
    """Print where each instance of a configuration would run; start nothing, write nothing."""
    deployment = make_deployment(args, specs[0], args.runs_dir / "dry-run", "plan", layout)
    gpus = f" ({gpu_names(layout.gpus)})" if layout.gpus else ""
    lines = [f"plan: {deployment.topology} beside an oracle, on {layout.device.value}{gpus}"
             f"{', over HTTP (--serve)' if args.serve else ''}; nothing started",
             f"configurations, one at a time in these places: {', '.join(s.label for s in specs)}",
             "ports: free loopback ports, drawn as instances are made (a run draws its own)"]
    rows = [("instance", "role", "devices", "ports", "environment", "engine args")]
    rows += [plan_row(instance) for instance in deployment.instances]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    for line in lines:
        console.print(line, markup=False, highlight=False)
    return 0


def plan_row(instance) -> tuple[str, ...]:
    """One instance's line of the plan: what differs from one instance to another."""
    engine = instance.placement.engine_args()
    if instance.spec.connector is not None:
        engine["kv_role"] = instance.spec.connector.kv_transfer_config(instance.run_dir, 0, instance.role)["kv_role"]
    return (instance.name, instance.role.value, instance.placement.devices,
            " ".join(f"{use}={port}" for use, port in instance.ports.items()) or "-",
            " ".join(f"{k}={v}" for k, v in instance.env.items()) or "-",
            " ".join(f"{k}={v}" for k, v in engine.items()) or "-")


def run_gate(args, specs: list[EngineSpec], layout: Layout, stack: ExitStack, console: Console) -> int:
    workloads = [workload(args, spec) for spec in specs]
    store = RunStore(args.runs_dir)
    stack.callback(store.close)
    deployments = [make_deployment(args, spec, store.folder, f"{i}-{spec.model.name}-{spec.dtype}", layout)
                   for i, spec in enumerate(specs)]
    overlap = layout.device is Device.CPU  # start the next configuration while this one is checked
    for deployment in deployments:
        stack.callback(deployment.close)
    console.print(f"run folder: {store.folder}")
    configs = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting instances", total=sum(map(len, workloads)))
        deployments[0].start()
        for i, (deployment, requests) in enumerate(zip(deployments, workloads)):
            progress.update(task, description=f"starting {deployment.spec.label}")
            deployment.wait_ready()
            if overlap and i + 1 < len(deployments):
                deployments[i + 1].start()
            progress.update(task, description=f"checking {deployment.spec.label}")
            faults = plan(args.nemesis, len(requests)) if args.nemesis is not None else []
            configs.append(run_config(deployment, requests, store.history, faults=faults, drain_s=args.drain_s,
                                      on_result=lambda _: progress.advance(task)))
            deployment.close()
            if not overlap and i + 1 < len(deployments):
                deployments[i + 1].start()
    failures = [(spec, sent, cfg, c) for spec, sent, cfg in zip(specs, workloads, configs) for c in cfg.failures]
    leaked = [f"{cfg.config} {leak}" for cfg in configs for leak in cfg.leaks]
    verdict = "valid" if not failures and not leaked else "invalid"
    store.write_results(RunResults(verdict, tuple(configs)))
    report.print_summary(console, configs)
    report.print_known_defects(console, configs)
    for spec, sent, cfg, c in failures:
        console.print(report.failure_line(c), markup=False, highlight=False)
        index = cfg.requests.index(c)
        replay = replay_command(spec, args.seed, args.max_tokens, [r.prompt_len for r in cfg.requests[: index + 1]],
                                args.nemesis, args.drain_s, args.topology, args.workload)
        repro = make_repro(spec, args.topology, args.seed, sent[: index + 1], c.outcome, c.leak or c.verdict.detail,
                           cfg.faults, args.drain_s)
        path = write_repro(repro, store.folder / f"repro-{len(sent[index].prompt)}-{spec.model.name}-{spec.dtype}.json")
        console.print(f"  replay: {replay}\n  reproduce: pdcheck repro {path}", markup=False, highlight=False)
    for leak in leaked:
        console.print(f"leak after drain: {leak}", markup=False, highlight=False)
    console.print(f"verdict: {verdict}   results: {store.folder / 'results.json'}", markup=False)
    console.print(f"report: {write_report(store.folder)}", markup=False)
    return 0 if verdict == "valid" else 1

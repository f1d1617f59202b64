"""The command line: `pdcheck run` (the gate on a workload), `pdcheck proxy` (the PD proxy, in the
foreground), `pdcheck serve` (one vLLM server behind it) and `pdcheck bench ...`.

Exit codes: 0 every request matched the oracle (known defects aside), 1 something diverged,
errored, hung, fell back, or a known defect no longer shows, 2 the run could not be made (bad
input, or an instance that would not start). Every instance is stopped on every path out.
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from pdcheck.config import DTYPES, EngineSpec, connector_spec, model_path
from pdcheck.cluster.instance import stop_engine_server
from pdcheck.errors import BadInput, InstanceFailed
from pdcheck.proxy.policies import POLICIES
from pdcheck.workload.phases import LOCAL, workload_names

DEFAULT_MODELS = ["tiny-llama", "tiny-qwen3-moe"]
DEFAULT_CONNECTOR = "ExampleConnector"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdcheck", description="PD serving correctness gate")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run PD beside a single-engine oracle and compare every token")
    add_engine_options(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-tokens", type=int, default=16)
    run.add_argument("--lengths", type=lengths_option, help="only prompts of these lengths, e.g. 64,65")
    run.add_argument("--workload", type=workload_option, default=("boundary",),
                     help=f"phases to send, one request after another, e.g. boundary,shared-prefix "
                          f"(among {', '.join(LOCAL)}; default boundary)")
    run.add_argument("--topology", type=topology_option, default=(1, 1), help="xPyD, e.g. 2P2D (default 1P1D)")
    run.add_argument("--serve", action="store_true", help="`pdcheck serve` instances behind the proxy, over HTTP")
    run.add_argument("--drain-s", type=float, default=10.0,
                     help="how long the drain after the workload waits for instances to free what they hold")
    run.add_argument("--nemesis", type=int, metavar="SEED",
                     help="on a seeded schedule: pause prefill (between the legs) or decode (as a batch starts), "
                          "or abandon a batch between the legs")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan and start nothing: where each instance would run (with --target: "
                          "the black-box plan, no completion sent)")
    placement = run.add_argument_group("placement: where instances run (pdcheck/cluster/placement.py)")
    placement.add_argument("--device", choices=["cpu", "cuda"],
                           help="default: cuda where --gpus is given or a CUDA GPU is visible, else cpu")
    placement.add_argument("--gpus", type=int, metavar="N",
                           help="use the first N visible GPUs (default all); with --dry-run, plan for a runner of N")
    for role in ("prefill", "decode", "oracle"):
        placement.add_argument(f"--{role}-tp", type=int, default=1, metavar="N",
                               help=f"tensor-parallel size of each {role} instance (cuda)")
    blackbox = run.add_argument_group("black-box mode: a deployment pdcheck did not start")
    blackbox.add_argument("--target", help="the PD deployment's OpenAI-compatible URL")
    blackbox.add_argument("--oracle", help="a single-node baseline's OpenAI-compatible URL")
    blackbox.add_argument("--tokenizer", help="a local tokenizer, where the target has no /tokenize")
    blackbox.add_argument("--max-requests", type=int, default=400, help="request budget, both endpoints")
    blackbox.add_argument("--rate", type=float, default=20.0, help="requests per second at most")
    blackbox.add_argument("--metrics", action="append", help="a vLLM server's URL whose /metrics show leaks (repeatable)")
    blackbox.add_argument("--hook", action="append", help="N:COMMAND, run before workload request N (repeatable)")
    blackbox.add_argument("--heal", action="append", help="N:COMMAND undoing a hook; every heal runs by the end")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"))
    bench = commands.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True)
    startup = which.add_parser("startup", help="instance start-up times, median of --repeat")
    startup.add_argument("--model", default="tiny-llama")
    startup.add_argument("--repeat", type=int, default=5)
    startup.add_argument("--runs-dir", type=Path, default=Path("runs"))
    tcp = which.add_parser("tcp", help="the reference connector's TCP plane against a plain socket")
    tcp.add_argument("--mib", type=int, default=64, help="bytes per transfer, in MiB")
    tcp.add_argument("--repeat", type=int, default=9)
    proxy_bench = which.add_parser("proxy", help="latency the PD proxy adds, against fake backends")
    proxy_bench.add_argument("--requests", type=int, default=300)
    proxy_bench.add_argument("--warmup", type=int, default=30)
    add_proxy_parser(commands)
    add_serve_parser(commands)
    add_test_parser(commands)
    add_mutants_parser(commands)
    repro = commands.add_parser("repro", help="replay a failure saved by `pdcheck run` (repro-*.json)")
    repro.add_argument("file", type=Path)
    repro.add_argument("--shrink", action="store_true", help="drop earlier requests while it still fails")
    repro.add_argument("--export", type=Path, help="also write a standalone script (vLLM and torch only)")
    repro.add_argument("--runs-dir", type=Path, default=Path("runs"))
    return parser


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="vLLM's OpenAI server for one role, heartbeating to a proxy")
    serve.add_argument("--role", choices=["prefill", "decode", "single"], required=True)
    serve.add_argument("--model", default="tiny-llama", help="model folder or embedded name")
    serve.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    serve.add_argument("--block-size", type=int, default=32)
    serve.add_argument("--max-model-len", type=int, default=256)
    serve.add_argument("--connector", default="reference", help="vLLM built-in name, module:Class or file.py:Class")
    serve.add_argument("--connector-config", help="JSON object for kv_connector_extra_config")
    serve.add_argument("--profile", help="a JSON or TOML file of connector profile fields")
    serve.add_argument("--port", type=int, required=True, help="HTTP port")
    serve.add_argument("--kv-port", type=int, default=0, help="the connector's port (`{port}` in its config)")
    serve.add_argument("--proxy", help="the proxy's heartbeat address, host:port (prefill and decode roles)")
    serve.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    serve.add_argument("--run-dir", type=Path, default=Path("runs/serve"), help="the connector's `{run_dir}`")


def add_test_parser(commands) -> None:
    test = commands.add_parser("test", help="the conformance battery against a connector (pytest)",
                               description="Every failure class against the connector under test. "
                                           "Arguments after -- go to pytest (e.g. -- -k aborts -x).")
    test.add_argument("--connector", required=True, help="vLLM built-in name, module:Class or file.py:Class")
    test.add_argument("--connector-config", help="JSON object for kv_connector_extra_config")
    test.add_argument("--profile", help="a JSON or TOML file of connector profile fields")
    test.add_argument("--decode-prompt", choices=["original", "with_first_token"])
    test.add_argument("--model", action="append", help="model folder or embedded name (repeatable; default both)")
    test.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable; default both")
    test.add_argument("--runs-dir", type=Path, default=Path("runs"), help="engines' folders go under RUNS_DIR/battery")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")


def add_mutants_parser(commands) -> None:
    mutants = commands.add_parser("mutants", help="run the test that catches each known-bug mutant, timed")
    mutants.add_argument("--only", action="append", metavar="NAME", help="only this catalogue entry (repeatable)")
    mutants.add_argument("--runs-dir", type=Path, default=Path("runs"))
    mutants.add_argument("--timeout-s", type=float, default=600.0, help="per catching test")


def add_proxy_parser(commands) -> None:
    proxy = commands.add_parser("proxy", help="the PD proxy: vLLM's OpenAI API over instances found by heartbeat")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--heartbeat-port", type=int, required=True)
    proxy.add_argument("--policy", choices=list(POLICIES), default="round_robin")
    proxy.add_argument("--seed", type=int, default=0, help="for --policy random")
    proxy.add_argument("--timeout-s", type=float, default=30.0, help="per upstream leg")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", help="model folder or embedded name (repeatable)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable; default: both")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--connector", default=DEFAULT_CONNECTOR, help="vLLM built-in name, module:Class or file.py:Class")
    parser.add_argument("--connector-config", help="JSON object for kv_connector_extra_config")
    parser.add_argument("--decode-prompt", choices=["original", "with_first_token"])
    parser.add_argument("--profile", help="a JSON or TOML file of connector profile fields (pdcheck/profiles.py)")


def lengths_option(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def workload_option(text: str) -> tuple[str, ...]:
    try:
        return workload_names(text)
    except BadInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def topology_option(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-8])P([1-8])D", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"expected xPyD with x, y in 1..8 (e.g. 2P2D), got {text!r}")
    return int(match[1]), int(match[2])


def engine_specs(args) -> list[EngineSpec]:
    connector = connector_spec(args.connector, args.connector_config, args.decode_prompt, args.profile)
    models = [model_path(m) for m in (args.model or DEFAULT_MODELS)]
    return [
        EngineSpec(model=m, dtype=d, block_size=args.block_size, max_model_len=args.max_model_len, connector=connector)
        for m in models for d in (args.dtype or DTYPES)
    ]


def serve_spec(args) -> EngineSpec:
    """The instance's spec, or BadInput for anything that would fail once vLLM has started:
    checked first what needs no vLLM, then (prefill, decode) the connector's own settings."""
    import dataclasses

    from pdcheck.cluster.http_server import check_connector_options, check_connector_settings, check_port_free
    from pdcheck.config import Role

    if args.role != "single" and not (args.proxy and args.kv_port):
        raise BadInput(f"--role {args.role} needs --proxy (the proxy's heartbeat address) and --kv-port")
    check_port_free("--port", args.port)
    if args.kv_port:
        if args.kv_port == args.port:
            raise BadInput(f"--kv-port {args.kv_port}: the same as --port")
        check_port_free("--kv-port", args.kv_port)
    check_connector_options(args.connector_config, args.profile)
    spec = EngineSpec(model=model_path(args.model), dtype=args.dtype, block_size=args.block_size,
                      max_model_len=args.max_model_len)
    try:  # the connector writes there from its first request: a folder that cannot be made fails now
        args.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--run-dir {args.run_dir}: cannot be made ({e.strerror})") from None
    if args.role == "single":
        return spec
    import vllm  # noqa: F401  (the server imports it anyway; the connector's class is then resolved here)

    connector = connector_spec(args.connector, args.connector_config, None, args.profile)
    check_connector_settings(connector, args.run_dir, args.kv_port, Role(args.role))
    return dataclasses.replace(spec, connector=connector)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # soft_wrap: a path or command line printed is never folded, so it can be copied (tables still fit the width)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120, soft_wrap=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)  # `kill -USR1`: every stack
    try:
        with ExitStack() as stack:
            stack.callback(stop_engine_server)
            if args.command == "run" and (args.target or args.oracle):
                from pdcheck.blackbox.runner import run_blackbox

                return run_blackbox(args, stack, console)
            if args.command == "run":
                from pdcheck.cluster.placement import check_connector_fits, choose_layout
                from pdcheck.runner import dry_run, run_gate

                layout = choose_layout(args.device, args.gpus, args.dry_run, prefill_tp=args.prefill_tp,
                                       decode_tp=args.decode_tp, oracle_tp=args.oracle_tp)
                specs = engine_specs(args)
                check_connector_fits(layout, [spec.connector for spec in specs])
                if args.dry_run:
                    return dry_run(args, specs, layout, console)
                return run_gate(args, specs, layout, stack, console)
            if args.command == "repro":
                from pdcheck.repro.case import run_repro

                return run_repro(args, stack, console)
            if args.command == "test":
                from pdcheck.conformance.command import run_battery

                return run_battery(args)
            if args.command == "mutants":
                from pdcheck.bench.mutants import bench_mutants

                return bench_mutants(args, stack, console)
            if args.command == "serve":
                from pdcheck.cluster.http_server import serve

                return serve(args, serve_spec(args))
            if args.command == "proxy":
                from pdcheck.proxy.server import run_foreground

                return run_foreground(args, stack, console)
            if args.bench == "proxy":
                from pdcheck.bench.proxy import bench_proxy

                return bench_proxy(args, stack, console)
            from pdcheck.bench import startup as bench

            return {"startup": bench.bench_startup, "tcp": bench.bench_tcp}[args.bench](args, stack, console)
    except BadInput as e:
        print(f"pdcheck: error: {e}", file=sys.stderr)
        return 2
    except InstanceFailed as e:
        print(f"pdcheck: could not run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdcheck: interrupted; every instance was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

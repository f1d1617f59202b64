"""Single-instance mode, for connectors that keep KV for the instance itself rather than hand it
to another (OffloadingConnector, SimpleCPUOffloadConnector, a store such as ExampleConnector's).

One engine with the connector on, prefix caching on and a KV pool small enough that later prompts
evict a prompt's blocks, beside the oracle (the same engine, no connector). A prompt is sent, then
prompts that evict it, then it again, alone and beside another: every answer must be the oracle's,
a repeat must have read back the whole blocks of its prompt before the last token (less what the
engine still found in its own prefix cache; else `fallback` or `partial`), and nothing may be
held after the drain.

    python -m pdcheck.single --connector ExampleConnector [--connector-config JSON] [--profile FILE]
                             [--model M] [--dtype D]

Exit 0 every request passed, 1 a failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import msgspec

from pdcheck.checker.oracle import Oracle
from pdcheck.cluster.instance import Instance, stop_engine_server
from pdcheck.cluster.placement import Layout
from pdcheck.config import EngineSpec, Role, connector_spec, model_path
from pdcheck.errors import BadInput
from pdcheck.gate import Expect, run_config
from pdcheck.history import History
from pdcheck.profiles import ExpectedLoad, Profile
from pdcheck.report.terminal import failure_line
from pdcheck.types import ConfigResult, GenRequest, GenResult, PDResult
from pdcheck.workload.boundary import FIRST_ORDINARY_TOKEN

FIRST_LENS, FILLER_LEN, FILLERS, MAX_TOKENS, SEED = (127, 128, 129, 130), 129, 4, 16, 0
NUM_BLOCKS = 12  # 11 usable blocks of 32 tokens: the fillers alone need 20, so they evict every first prompt
DEADLINE_S, DRAIN_S = 60.0, 15.0
EXPECTED = ExpectedLoad.WHOLE_BLOCKS_BUT_LAST  # the engine computes a prompt's last token itself


def workload(spec: EngineSpec) -> list[tuple[list[GenRequest], int]]:
    """Phases, each with how many of its requests go at once: prompts around a block edge and
    fillers that evict them, one at a time; each prompt again alone; the last again beside a
    filler."""
    vocab = json.loads((spec.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(f"{SEED}-single")

    def request(rid, n):
        return GenRequest(request_id=rid, prompt=[rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(n)],
                          max_tokens=MAX_TOKENS)

    firsts = [request(f"first-len{n}", n) for n in FIRST_LENS]
    fillers = [request(f"filler-{i}", FILLER_LEN) for i in range(FILLERS)]
    again = [msgspec.structs.replace(r, request_id=f"{r.request_id}-again") for r in firsts]
    pair = [msgspec.structs.replace(firsts[-1], request_id=f"{firsts[-1].request_id}-third"),
            msgspec.structs.replace(fillers[0], request_id="filler-0-again")]
    return [(firsts + fillers, 1), (again, 1), (pair, len(pair))]


class SingleCluster:
    """One engine with the connector beside the oracle (pdcheck.cluster.Cluster): no legs, so
    each request goes to that engine whole, and what it read back through the connector is its
    cached tokens less its own prefix-cache hit."""

    topology = "single"

    def __init__(self, spec: EngineSpec, folder: Path):
        single_place, oracle_place = Layout().place([Role.SINGLE, Role.SINGLE])
        self.spec = spec
        self.single = Instance("single", spec, Role.SINGLE, folder, single_place)
        self.oracle = Instance("oracle", spec.without_connector(), Role.SINGLE, folder, oracle_place)
        self.instances = [self.single]

    def client(self) -> SingleCluster:
        return self

    def pair(self, batch: int) -> None:
        return None

    def send(self, requests: list[GenRequest], batch: int, deadline_s: float, between=None) -> list[PDResult]:
        return [PDResult(result=r, external_tokens=r.external_tokens, prefill=GenResult(r.request_id),
                         local_tokens=r.local_cached_tokens) for r in self.single.generate(requests, deadline_s)]

    def transfers(self) -> dict:
        return {}

    def revive(self) -> None:
        if self.single.start_s is not None and not self.single.alive:
            self.single.restart()

    def __enter__(self) -> SingleCluster:
        try:
            for instance in (self.single, self.oracle):
                instance.start()
            for instance in (self.single, self.oracle):
                instance.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for instance in (self.single, self.oracle):
            instance.close()


def run(spec: EngineSpec, folder: Path) -> list[ConfigResult]:
    """The workload's phases through `run_config` on one connector instance beside the oracle:
    nothing is due to be read back the first time a prompt is sent; its whole blocks before the
    last token (less the engine's own prefix-cache hit) each time after."""
    phases = workload(spec)
    history = History(folder / "history.jsonl")
    try:
        with SingleCluster(spec, folder) as cluster:
            oracle = Oracle(cluster.oracle)
            oracle.calibrate([r for requests, _ in phases for r in requests])
            first, *repeats = phases
            unseen = Expect(spec.block_size, loads=False)
            seen = Expect(spec.block_size, Profile(expected_load=EXPECTED))
            results = [run_config(cluster, first[0], history, oracle=oracle, concurrency=first[1], drain_s=DRAIN_S,
                                  expect=unseen)]
            results += [run_config(cluster, requests, history, oracle=oracle, concurrency=concurrency, drain_s=DRAIN_S,
                                   expect=seen) for requests, concurrency in repeats]
    finally:
        history.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdcheck.single", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connector", required=True)
    parser.add_argument("--connector-config")
    parser.add_argument("--profile")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "single")
    args = parser.parse_args(argv)
    try:
        model = model_path(args.model)  # before the connector is resolved, which starts the engine server
        connector = connector_spec(args.connector, args.connector_config, None, args.profile)
        spec = EngineSpec(model=model, dtype=args.dtype, connector=connector, prefix_caching=True, num_blocks=NUM_BLOCKS)
        folder = args.runs_dir / f"{spec.model.name}-{spec.dtype}"
        folder.mkdir(parents=True, exist_ok=True)
        results = run(spec, folder.resolve())
    except BadInput as e:
        print(f"pdcheck single: error: {e}", file=sys.stderr)
        return 2
    finally:
        stop_engine_server()
    for c in (c for result in results for c in result.requests):
        print(f"{c.verdict.request_id}: {c.outcome} {c.verdict.detail} (read back {c.external_tokens}, "
              f"local hit {c.local_tokens})")
    failures = failure_lines(results)
    print("\n".join(failures) if failures else "all passed")
    return 1 if failures else 0


def failure_lines(results: list[ConfigResult]) -> list[str]:
    """A line per request that failed and per instance still holding after a drain."""
    return [failure_line(c) for result in results for c in result.failures] + [
        f"leak after drain: {leak}" for result in results for leak in result.leaks]


if __name__ == "__main__":
    sys.exit(main())

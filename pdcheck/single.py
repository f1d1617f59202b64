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

from pdcheck.checker.compare import judge
from pdcheck.checker.oracle import Oracle
from pdcheck.cluster.instance import Instance, stop_engine_server
from pdcheck.cluster.placement import Layout
from pdcheck.config import EngineSpec, Role, connector_spec, model_path
from pdcheck.errors import BadInput
from pdcheck.profiles import ExpectedLoad
from pdcheck.types import GenRequest, Outcome
from pdcheck.workload.boundary import FIRST_ORDINARY_TOKEN

FIRST_LENS, FILLER_LEN, FILLERS, MAX_TOKENS, SEED = (127, 128, 129, 130), 129, 4, 16, 0
NUM_BLOCKS = 12  # 11 usable blocks of 32 tokens: the fillers alone need 20, so they evict every first prompt
DEADLINE_S, DRAIN_S = 60.0, 15.0
EXPECTED = ExpectedLoad.WHOLE_BLOCKS_BUT_LAST  # the engine computes a prompt's last token itself


def workload(spec: EngineSpec) -> list[list[GenRequest]]:
    """Batches: prompts around a block edge, fillers that evict them, then each prompt again
    alone, then the last again beside a filler."""
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
    return [[r] for r in firsts + fillers + again] + [pair]


def run(spec: EngineSpec, folder: Path) -> list[str]:
    """The workload on one connector instance beside the oracle; a line per request that failed
    and per instance still holding after the drain."""
    single_place, oracle_place = Layout().place([Role.SINGLE, Role.SINGLE])
    single = Instance("single", spec, Role.SINGLE, folder, single_place)
    oracle = Instance("oracle", spec.without_connector(), Role.SINGLE, folder, oracle_place)
    try:
        for instance in (single, oracle):
            instance.start()
        for instance in (single, oracle):
            instance.wait_ready()
        batches = workload(spec)
        reference = Oracle(oracle)
        calibration = reference.calibrate([r for batch in batches for r in batch])
        seen, failures = set(), []
        for batch in batches:
            for request, result in zip(batch, single.generate(batch, DEADLINE_S)):
                expected = reference.results([request])[0]
                due = EXPECTED.tokens(len(request.prompt), spec.block_size)
                due = max(0, due - result.local_cached_tokens) if tuple(request.prompt) in seen else 0
                verdict = judge(expected, result, calibration.rule, calibration.tolerance, result.external_tokens, due)
                line = (f"{spec.label} {request.request_id}: {verdict.outcome.value} {verdict.detail} "
                        f"(read back {result.external_tokens}, local hit {result.local_cached_tokens})")
                print(line)
                if verdict.outcome is not Outcome.MATCH:
                    failures.append(line)
            seen.update(tuple(r.prompt) for r in batch)
        state = single.drain(DRAIN_S)
        if state is None or not state.idle:
            failures.append(f"leak after drain: single: {state or 'not running'}")
        return failures
    finally:
        for instance in (single, oracle):
            instance.close()


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
        failures = run(spec, folder.resolve())
    except BadInput as e:
        print(f"pdcheck single: error: {e}", file=sys.stderr)
        return 2
    finally:
        stop_engine_server()
    print("\n".join(failures) if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

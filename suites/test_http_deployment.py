"""The real deployment shape: 2P2D `pdcheck serve` instances (vLLM's OpenAI server with the
reference connector) behind the PD proxy, beside a single `pdcheck serve` oracle.

Every request goes through the proxy over HTTP, once whole and once streamed, and must match
the oracle token for token with bitwise-equal logprobs; streaming must equal non-streaming; every
prompt longer than a block must have been loaded through the connector (decode's cached-token
count and the transfer logs say so). Bad requests get a 4xx naming the problem and the proxy
keeps serving. An instance that leaves mid-run loses no request (each completes or fails with a
clear error within its deadline) and is no longer routed to once expired; one that joins
starts getting requests.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from pdcheck.checker.compare import judge
from pdcheck.client.http import complete, complete_all
from pdcheck.config import EngineSpec, Role, connector_spec, model_path
from pdcheck.types import GenRequest, Outcome, Rule
from pdcheck.workload.boundary import boundary_workload

pytestmark = pytest.mark.vllm
MODEL = "tiny-llama"
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def served(pd_run_dir, pd_pool):
    from pdcheck.cluster.http_cluster import ServedCluster

    pd_pool.release()  # five served instances: the pool's engines would crowd them out of memory and cores

    spec = EngineSpec(model=model_path(MODEL), dtype="bfloat16", connector=connector_spec("reference"))
    with ServedCluster(spec, pd_run_dir / "served-2p2d", num_prefill=2, num_decode=2) as cluster:
        yield cluster


def loads_by_file(cluster) -> dict[str, list[int]]:
    """Per decode transfer log: the block count of each successful load, in order."""
    found = {}
    for path in sorted(cluster.folder.glob("transfers-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        found[path.name] = [r["blocks"] for r in records if r["side"] == "load" and not r.get("error")]
    return found


def test_2p2d_through_the_proxy_matches_the_oracle_whole_and_streamed(served):
    spec = served.spec
    requests = boundary_workload(spec)
    failures = []
    for request in requests:
        oracle = complete(served.oracle.url, MODEL, request, timeout_s=DEADLINE_S)
        whole = complete(served.proxy.url, MODEL, request, timeout_s=DEADLINE_S)
        streamed = complete(served.proxy.url, MODEL, request, stream=True, timeout_s=DEADLINE_S)
        long = len(request.prompt) > spec.block_size
        for how, result in (("whole", whole), ("streamed", streamed)):
            verdict = judge(oracle, result, Rule.STRICT, 0.0, result.num_cached_tokens, expected_external=int(long))
            if verdict.outcome is not Outcome.MATCH:
                failures.append(f"len {len(request.prompt)} {how}: {verdict.outcome.value} {verdict.detail}")
            if long and result.num_cached_tokens != len(request.prompt) - 1:
                failures.append(f"len {len(request.prompt)} {how}: decode loaded {result.num_cached_tokens} tokens")
        if (streamed.token_ids, streamed.logprobs) != (whole.token_ids, whole.logprobs):
            failures.append(f"len {len(request.prompt)}: streamed output differs from the whole response")
    assert not failures, "\n".join(failures)
    # decode loads the blocks of all prompt tokens but the last; round-robin splits the 2N legs evenly
    loads = {name: blocks for name, blocks in loads_by_file(served).items() if blocks}
    expected = [-(-(len(r.prompt) - 1) // spec.block_size) for r in requests]
    assert sorted(b for blocks in loads.values() for b in blocks) == sorted(expected * 2), loads
    assert sorted(map(len, loads.values())) == [len(requests)] * 2, f"loads per decode: {loads}"


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "JSON"),
    ({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "no-such-model", "prompt": [5, 6, 7], "max_tokens": 4}, 400, "no-such-model"),
    ({"model": MODEL, "prompt": [5] * 300, "max_tokens": 4}, 400, "maximum context length"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_proxy_keeps_serving(served, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = urllib.request.Request(f"{served.proxy.url}/v1/completions", data=data,
                                  headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(http, timeout=DEADLINE_S)
    text = refused.value.read().decode()
    assert refused.value.code == status and message.lower() in text.lower(), text
    good = boundary_workload(served.spec)[10]
    assert complete(served.proxy.url, MODEL, good, timeout_s=DEADLINE_S).ok


def test_black_box_run_against_the_deployment_matches_and_records_a_pause_hook(served, tmp_path):
    """`pdcheck run --target --oracle` on the running deployment: every phase and client fault
    matches, nothing leaks, and the hook that pauses decode (and its heal) are in the history."""
    from pdcheck.cli import main
    from pdcheck.history import Fault, read_history

    decode = served.decodes[0].process.pid
    argv = ["run", "--target", served.proxy.url, "--oracle", served.oracle.url, "--runs-dir", str(tmp_path),
            "--hook", f"3:kill -STOP {decode}", "--heal", f"3:sleep 0.5; kill -CONT {decode}"]
    for instance in [*served.prefills, *served.decodes]:
        if instance.alive:
            argv += ["--metrics", instance.url]
    assert main(argv) == 0
    history = read_history(tmp_path / "latest" / "history.jsonl")
    faults = [op for op in history if isinstance(op, Fault)]
    hooks = [(f.phase, f.before_request, f.returncode) for f in faults if f.fault == "hook"]
    assert hooks == [("inject", 3, 0), ("heal", 3, 0)]
    faults = {f.fault for f in faults}
    assert {"abort-mid-stream", "disconnect"} <= faults
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert results["verdict"] == "valid" and {c["config"] for c in results["configs"]} >= {
        "repeated-concurrent", "api", "client-faults"}
    api = next(c for c in results["configs"] if c["config"] == "api")
    assert {r["verdict"]["request_id"] for r in api["requests"]} >= {"api-n2-seeded", "api-chat", "api-greedy-logprobs"}


def test_the_openai_client_through_the_proxy_gets_the_oracles_answers(served):
    """The openai package, as an application would use it: n=2 with a seed and logprobs, chat
    with a seed, a stream with usage. Each answer through the proxy equals the oracle's."""
    import openai

    from pdcheck.workload.api import MESSAGES, PROMPT

    def ask(url: str) -> list:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=DEADLINE_S, max_retries=0)
        with client:
            completion = client.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=7, temperature=0.9,
                                                   logprobs=2, max_tokens=12)
            chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3, temperature=0.8,
                                                  max_tokens=12, logprobs=True, top_logprobs=2)
            stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            chunks = list(stream)
        return [[(c.text, c.finish_reason, c.logprobs.tokens) for c in completion.choices],
                [(c.message.content, c.finish_reason, [t.token for t in c.logprobs.content]) for c in chat.choices],
                "".join(c.text for chunk in chunks for c in chunk.choices),
                next(chunk.usage.completion_tokens for chunk in chunks if chunk.usage)]

    through_pd = ask(served.proxy.url)
    assert through_pd == ask(served.oracle.url)
    assert len(through_pd[0]) == 2 and through_pd[0][0] != through_pd[0][1]  # two seeded choices, not one twice


def test_vllms_benchmark_client_completes_every_request_through_the_proxy(served, tmp_path):
    """vLLM's own benchmark client (vllm.benchmarks.serve, called as a module) on random
    prompts against the proxy: every request completes."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--backend", "vllm", "--base-url", served.proxy.url, "--model", MODEL,
                              "--tokenizer", str(served.spec.model), "--dataset-name", "random",
                              "--random-input-len", "80", "--random-output-len", "8", "--num-prompts", "24",
                              "--request-rate", "8", "--seed", "0", "--ignore-eos", "--disable-tqdm",
                              "--result-dir", str(tmp_path)])
    result = main(args)
    assert result["completed"] == 24 and result["failed"] == 0, {k: result.get(k) for k in ("completed", "failed")}


def test_decode_leaving_mid_run_loses_no_request_and_one_joining_gets_requests(served):
    spec = served.spec
    request = boundary_workload(spec)[12]
    expected = complete(served.oracle.url, MODEL, request, timeout_s=DEADLINE_S)
    burst = [GenRequest(f"leave-{i}", request.prompt, request.max_tokens) for i in range(8)]
    leaving = served.decodes[1]
    leaving.signal(signal.SIGTERM)  # graceful stop while the burst is in flight
    started = time.monotonic()
    results = complete_all(served.proxy.url, MODEL, burst, timeout_s=DEADLINE_S)
    assert time.monotonic() - started < DEADLINE_S + 5
    for r in results:  # each completes as the oracle's, or fails with a clear error; none hangs
        assert not r.hung, r
        assert r.token_ids == expected.token_ids if r.ok else r.error, r
    leaving.close()
    time.sleep(served.proxy.settings.expiry_s + 2 * served.proxy.settings.heartbeat_interval_s)
    after = complete_all(served.proxy.url, MODEL, [GenRequest(f"after-{i}", request.prompt, request.max_tokens)
                                                  for i in range(4)], timeout_s=DEADLINE_S)
    assert all(r.ok and r.token_ids == expected.token_ids for r in after), after

    joined = served.add(Role.DECODE)
    joined.wait_ready()
    served.wait_registered(timeout_s=10.0)
    before = Counter({name: len(v) for name, v in loads_by_file(served).items()})
    more = [GenRequest(f"join-{i}", request.prompt, request.max_tokens) for i in range(4)]
    assert all(complete(served.proxy.url, MODEL, r, timeout_s=DEADLINE_S).token_ids == expected.token_ids for r in more)
    gained = Counter({name: len(v) for name, v in loads_by_file(served).items()}) - before
    assert gained.get(f"transfers-{joined.kv_port}.jsonl", 0) == 2, f"loads per transfer log: {gained}"


WRONG_AT = 3  # the output position the relay changes


def corrupting_relay(target: str):
    """An HTTP relay in front of `target` that returns plausible wrong tokens: the token id at
    output position WRONG_AT of every completion, whole or streamed, is moved by one. Everything
    else passes through unchanged. The black-box checker must see it as divergence."""
    import aiohttp
    from aiohttp import web

    from pdcheck.proxy.server import AppThread

    def damage(choices: list[dict], seen: int) -> int:
        for choice in choices:
            ids = choice.get("token_ids") or []
            if seen <= WRONG_AT < seen + len(ids):
                ids[WRONG_AT - seen] = (ids[WRONG_AT - seen] + 1) % 512
            seen += len(ids)
        return seen

    async def relay(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session, session.request(
                request.method, f"{target}{request.path_qs}", data=await request.read(),
                headers={"Content-Type": request.content_type}) as upstream:
            if not upstream.content_type.startswith("text/event-stream"):
                raw = await upstream.read()
                if request.path.endswith("/completions") and upstream.status == 200:
                    body = json.loads(raw)
                    damage(body.get("choices", []), 0)
                    raw = json.dumps(body).encode()
                return web.Response(body=raw, status=upstream.status, content_type=upstream.content_type)
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            seen = 0
            async for line in upstream.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    seen = damage(event.get("choices", []), seen)
                    line = b"data: " + json.dumps(event).encode() + b"\n"
                await response.write(line)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    return AppThread(app, name="pdcheck-corrupting-relay").start()


def test_a_deployment_returning_wrong_tokens_is_caught_from_outside(served, tmp_path):
    """Negative control for black-box mode: the same deployment behind a relay that moves one
    output token is judged diverged (exit 1), at that position."""
    from pdcheck.cli import main

    relay = corrupting_relay(served.proxy.url)
    try:
        code = main(["run", "--target", relay.url, "--oracle", served.oracle.url, "--runs-dir", str(tmp_path)])
    finally:
        relay.stop()
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    verdicts = [r["verdict"] for c in results["configs"] for r in c["requests"] if c["config"] != "api"]
    diverged = [v for v in verdicts if v["outcome"] == "diverged"]
    assert code == 1 and diverged and all(v["position"] == WRONG_AT for v in diverged), verdicts
    api = {r["verdict"]["request_id"]: r["verdict"] for c in results["configs"] if c["config"] == "api" for r in c["requests"]}
    assert api["api-greedy"]["outcome"] == "diverged" and "token_ids[3]" in api["api-greedy"]["detail"], api["api-greedy"]

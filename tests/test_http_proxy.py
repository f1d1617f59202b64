"""The HTTP proxy end to end, on loopback, against fake vLLM backends (no vLLM): how the two legs
are built, streaming pass-through, round-robin fairness through heartbeats, expiry and rejoin,
bad requests, dead or hung backends, and heartbeat garbage. Every server, heartbeat thread and
socket a test starts is stopped by the `stack` fixture, which also checks none is left.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack

import pytest
import zmq
from aiohttp import web

from pdcheck.bench.proxy import registered
from pdcheck.errors import BadInput
from pdcheck.proxy.heartbeat import ENCODER, Heartbeat, HeartbeatSender
from pdcheck.proxy.policies import RoundRobin
from pdcheck.proxy.server import AppThread, Proxy, ProxySettings
from pdcheck.testing.fake_backend import FakeBackend

MODEL = "fake-model"
INTERVAL_S, EXPIRY_S = 0.05, 0.3
PREFILL_PARAMS = {"do_remote_prefill": True, "transfer_key": "key-1", "remote_prefill_cached_tokens": 3}
GOOD = {"model": MODEL, "prompt": "hello there", "max_tokens": 8}


@pytest.fixture
def stack():
    before = set(threading.enumerate())
    with ExitStack() as owned:
        yield owned
    left = [t.name for t in set(threading.enumerate()) - before]
    assert not left, f"threads left running: {left}"


def start_proxy(stack: ExitStack, **settings) -> Proxy:
    policy, template = settings.pop("policy", None), settings.pop("prefill_params", None)
    settings = {"heartbeat_interval_s": INTERVAL_S, "expiry_s": EXPIRY_S, "timeout_s": 2.0} | settings
    proxy = Proxy(ProxySettings(**settings), policy=policy, prefill_params=template).start()
    stack.callback(proxy.stop)
    return proxy


def start_backend(stack: ExitStack, name: str, **kwargs) -> FakeBackend:
    return stack.enter_context(FakeBackend(name, **kwargs))


def announce(stack: ExitStack, proxy: Proxy, role: str, http_address: str, model: str = MODEL) -> HeartbeatSender:
    beat = Heartbeat(role=role, http_address=http_address, kv_address=f"127.0.0.9:{7000 + len(role)}", model=model)
    sender = HeartbeatSender(beat, proxy.heartbeat_address, interval_s=INTERVAL_S).start()
    stack.callback(sender.stop)
    return sender


def addresses(proxy: Proxy, role: str) -> list[str]:
    return [m["http_address"] for m in registered(proxy.url)[role]]


def wait_until(condition, what: str, deadline_s: float = 3.0) -> float:
    """Seconds it took `condition()` to hold; fails the test past the deadline."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline_s, f"not within {deadline_s} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - started


def cluster(stack: ExitStack, prefills: int = 1, decodes: int = 1, **settings):
    proxy = start_proxy(stack, **settings)
    p = [start_backend(stack, f"p{i}", kv_transfer_params=PREFILL_PARAMS) for i in range(prefills)]
    d = [start_backend(stack, f"d{i}") for i in range(decodes)]
    for role, backends in (("prefill", p), ("decode", d)):
        for backend in backends:  # one at a time, so the join order is the list order
            announce(stack, proxy, role, backend.address)
            wait_until(lambda: backend.address in addresses(proxy, role), f"{backend.name} joins")
    return proxy, p, d


def post(url: str, body, headers: dict | None = None, timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def complete(proxy: Proxy, body=None, path: str = "/v1/completions") -> tuple[int, dict]:
    status, _, answer = post(proxy.url + path, GOOD if body is None else body)
    return status, json.loads(answer)


def test_round_robin_gives_each_prefill_and_decode_floor_or_ceil_of_n_over_k(stack):
    proxy, prefills, decodes = cluster(stack, prefills=3, decodes=2)
    n = 11
    for _ in range(n):
        assert complete(proxy)[0] == 200
    for group in (prefills, decodes):
        counts = [len(b.received) for b in group]
        assert sum(counts) == n and all(n // len(group) <= c <= -(-n // len(group)) for c in counts), counts
    assert [len(b.received) for b in prefills] == [4, 4, 3] and [len(b.received) for b in decodes] == [6, 5]


def test_prefill_leg_is_one_token_not_streamed_with_the_filled_prefill_params(stack):
    proxy, (prefill,), (decode,) = cluster(stack)
    status, _, answer = post(proxy.url + "/v1/completions", dict(GOOD, min_tokens=2, n=3), {"X-Request-Id": "req-7"})
    assert status == 200
    (path, headers, body), = prefill.received
    assert path == "/v1/completions" and headers["X-Request-Id"] == "req-7"
    assert body["max_tokens"] == 1 and body["stream"] is False and "min_tokens" not in body and body["n"] == 1
    kv_address = registered(proxy.url)["decode"][0]["kv_address"]
    assert body["kv_transfer_params"] == {"do_remote_decode": True, "remote_decode": kv_address}
    assert {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "kv_transfer_params", "n")} == {
        "model": MODEL, "prompt": "hello there"}


def test_a_custom_prefill_template_is_filled_and_merged_with_the_clients_params(stack):
    template = {"do_remote_decode": True, "peer": "kv://{decode_addr}/x", "retries": 2}
    proxy, (prefill,), _ = cluster(stack, prefill_params=template)
    assert complete(proxy, dict(GOOD, kv_transfer_params={"retries": 5}))[0] == 200
    kv_address = registered(proxy.url)["decode"][0]["kv_address"]
    assert prefill.bodies()[0]["kv_transfer_params"] == {"do_remote_decode": True, "peer": f"kv://{kv_address}/x",
                                                         "retries": 5}


def test_decode_leg_gets_the_original_body_and_prefills_params_minus_the_accounting_key(stack):
    proxy, (prefill,), (decode,) = cluster(stack)
    status, headers, answer = post(proxy.url + "/v1/completions", dict(GOOD, min_tokens=2))
    assert status == 200
    (path, decode_headers, body), = decode.received
    expected = {k: v for k, v in PREFILL_PARAMS.items() if k != "remote_prefill_cached_tokens"}
    assert body == dict(GOOD, min_tokens=2, kv_transfer_params=expected)
    request_id = prefill.received[0][1]["X-Request-Id"]
    assert decode_headers["X-Request-Id"] == request_id == headers["X-Request-Id"]
    assert json.loads(answer)["choices"][0]["text"] == decode.text


def test_chat_prefill_leg_caps_max_completion_tokens_too(stack):
    proxy, (prefill,), (decode,) = cluster(stack)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9,
            "stream": True, "stream_options": {"include_usage": True}}
    status, _, _ = post(proxy.url + "/v1/chat/completions", chat)
    assert status == 200
    leg = prefill.bodies()[0]
    assert leg["max_completion_tokens"] == 1 and leg["max_tokens"] == 1 and leg["stream"] is False
    assert "stream_options" not in leg
    assert decode.bodies()[0]["max_completion_tokens"] == 9 and decode.bodies()[0]["stream_options"]


@pytest.mark.parametrize("path, field", [("/v1/completions", "text"), ("/v1/chat/completions", "delta")])
def test_streaming_relays_decodes_sse_chunks_in_order_and_equals_the_non_streaming_text(stack, path, field):
    proxy, _, (decode,) = cluster(stack)
    body = GOOD if path == "/v1/completions" else {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    status, headers, streamed = post(proxy.url + path, dict(body, stream=True), {"X-Request-Id": "s-1"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert streamed == b"".join(decode.chunks(path.endswith("chat/completions"), "s-1"))
    events = [line[6:] for line in streamed.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    text = "".join(c["text"] if field == "text" else c["delta"]["content"] for c in choices)
    _, whole = complete(proxy, body, path)
    choice = whole["choices"][0]
    assert text == (choice["text"] if field == "text" else choice["message"]["content"]) == decode.text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object, got list"),
    ("/v1/completions", {"model": MODEL, "max_tokens": 4}, "'prompt' is required"),
    ("/v1/chat/completions", {"model": MODEL, "prompt": "x"}, "'messages' is required"),
    ("/v1/completions", dict(GOOD, model="other-model"), "model 'other-model' is not served"),
    ("/v1/completions", dict(GOOD, max_tokens=0), "'max_tokens' must be a positive integer, got 0"),
    ("/v1/completions", dict(GOOD, max_tokens=-3), "'max_tokens' must be a positive integer"),
    ("/v1/completions", dict(GOOD, max_tokens="8"), "'max_tokens' must be a positive integer, got '8'"),
    ("/v1/completions", dict(GOOD, max_tokens=2.5), "'max_tokens' must be a positive integer"),
    ("/v1/completions", dict(GOOD, max_tokens=True), "'max_tokens' must be a positive integer"),
    ("/v1/completions", dict(GOOD, stream="yes"), "'stream' must be true or false"),
    ("/v1/completions", dict(GOOD, kv_transfer_params=[1]), "'kv_transfer_params' must be an object"),
]


def test_each_bad_request_gets_400_naming_the_problem_and_the_proxy_still_serves(stack):
    proxy, (prefill,), (decode,) = cluster(stack)
    for path, body, message in BAD_REQUESTS:
        status, _, answer = post(proxy.url + path, body)
        error = json.loads(answer)["error"]
        assert (status, error["type"]) == (400, "invalid_request_error"), (body, answer)
        assert message in error["message"], (body, error)
    assert prefill.received == [] and decode.received == []
    assert complete(proxy)[0] == 200
    assert complete(proxy, {"prompt": "the only model served is implied"})[0] == 200


def test_a_prefill_4xx_comes_back_as_it_is_and_decode_is_not_called(stack):
    proxy = start_proxy(stack)
    prefill = start_backend(stack, "p0", kv_transfer_params=PREFILL_PARAMS, max_prompt_len=20)
    decode = start_backend(stack, "d0")
    announce(stack, proxy, "prefill", prefill.address)
    announce(stack, proxy, "decode", decode.address)
    wait_until(lambda: all(registered(proxy.url).values()), "both roles join")
    status, answer = complete(proxy, dict(GOOD, prompt="x" * 21))
    assert status == 400 and "maximum context length is 20" in answer["error"]["message"]
    assert decode.received == []
    assert complete(proxy)[0] == 200


def test_no_instance_of_a_role_gives_503(stack):
    proxy = start_proxy(stack)
    assert complete(proxy)[0] == 503
    prefill = start_backend(stack, "p0", kv_transfer_params=PREFILL_PARAMS)
    announce(stack, proxy, "prefill", prefill.address)
    wait_until(lambda: addresses(proxy, "prefill"), "prefill joins")
    status, answer = complete(proxy)
    assert status == 503 and "no decode instance" in answer["error"]["message"]


def test_a_silent_instance_expires_and_gets_no_more_requests(stack):
    proxy = start_proxy(stack)
    prefill = start_backend(stack, "p0", kv_transfer_params=PREFILL_PARAMS)
    announce(stack, proxy, "prefill", prefill.address)
    d0, d1 = start_backend(stack, "d0"), start_backend(stack, "d1")
    sender = announce(stack, proxy, "decode", d0.address)
    announce(stack, proxy, "decode", d1.address)
    wait_until(lambda: len(addresses(proxy, "decode")) == 2, "both decodes join")
    sender.stop()
    took = wait_until(lambda: addresses(proxy, "decode") == [d1.address], "d0 expires")
    assert took < EXPIRY_S + 2 * INTERVAL_S + 0.5
    before = len(d0.received)
    for _ in range(4):
        assert complete(proxy)[0] == 200
    assert len(d0.received) == before and len(d1.received) >= 4


def test_an_expired_instance_that_heartbeats_again_rejoins_and_gets_requests(stack):
    proxy, _, (d0,) = cluster(stack)
    d1 = start_backend(stack, "d1")
    sender = announce(stack, proxy, "decode", d1.address)
    wait_until(lambda: d1.address in addresses(proxy, "decode"), "d1 joins")
    sender.stop()
    wait_until(lambda: d1.address not in addresses(proxy, "decode"), "d1 expires")
    announce(stack, proxy, "decode", d1.address)
    wait_until(lambda: addresses(proxy, "decode") == [d0.address, d1.address], "d1 rejoins at the end")
    served_before = len(d1.received)
    for _ in range(4):
        assert complete(proxy)[0] == 200
    assert len(d1.received) - served_before == 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_backend_that_is_down_gives_502_naming_it(stack):
    proxy, _, _ = cluster(stack)
    proxy2 = start_proxy(stack)
    prefill = start_backend(stack, "p9", kv_transfer_params=PREFILL_PARAMS)
    dead = f"127.0.0.1:{closed_port()}"
    announce(stack, proxy2, "prefill", prefill.address)
    announce(stack, proxy2, "decode", dead)
    wait_until(lambda: all(registered(proxy2.url).values()), "both roles join")
    started = time.monotonic()
    status, answer = complete(proxy2)
    assert status == 502 and f"decode instance {dead}" in answer["error"]["message"]
    assert time.monotonic() - started < 2.0
    assert complete(proxy)[0] == 200


def test_a_backend_that_never_answers_gives_502_within_the_timeout(stack):
    proxy = start_proxy(stack, timeout_s=0.5)
    silent = stack.enter_context(socket.create_server(("127.0.0.1", 0)))  # listens, never accepts
    hung = f"127.0.0.1:{silent.getsockname()[1]}"
    decode = start_backend(stack, "d0")
    announce(stack, proxy, "prefill", hung)
    announce(stack, proxy, "decode", decode.address)
    wait_until(lambda: all(registered(proxy.url).values()), "both roles join")
    started = time.monotonic()
    status, answer = complete(proxy)
    took = time.monotonic() - started
    assert status == 502 and f"prefill instance {hung}: no answer within 0.5 s" in answer["error"]["message"]
    assert 0.5 <= took < 1.5, took


async def hang_up_after_one_chunk(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"index": 0, "text": "one "}]}\n\n')
    request.transport.close()
    return response


def test_a_decode_that_dies_mid_stream_ends_the_stream_with_an_error_event(stack):
    proxy = start_proxy(stack)
    prefill = start_backend(stack, "p0", kv_transfer_params=PREFILL_PARAMS)
    app = web.Application()
    app.router.add_post("/v1/completions", hang_up_after_one_chunk)
    decode = AppThread(app, name="pdcheck-dying-decode").start()
    stack.callback(decode.stop)
    announce(stack, proxy, "prefill", prefill.address)
    announce(stack, proxy, "decode", f"127.0.0.1:{decode.port}")
    wait_until(lambda: all(registered(proxy.url).values()), "both roles join")
    status, _, streamed = post(proxy.url + "/v1/completions", dict(GOOD, stream=True))
    first, last = [json.loads(e[6:]) for e in streamed.decode().split("\n\n") if e]
    assert status == 200 and first["choices"][0]["text"] == "one "
    assert last["error"]["type"] == "upstream_error" and f"127.0.0.1:{decode.port}" in last["error"]["message"]
    assert complete(proxy)[0] == 502


def test_a_bad_heartbeat_or_setting_is_refused_where_it_is_made():
    with pytest.raises(BadInput, match="http_address 'nohost': expected host:port"):
        Heartbeat(role="decode", http_address="nohost", kv_address=None, model=MODEL)
    with pytest.raises(BadInput, match="kv_address '127.0.0.1:0'"):
        Heartbeat(role="decode", http_address="127.0.0.1:80", kv_address="127.0.0.1:0", model=MODEL)
    with pytest.raises(BadInput, match="timeout_s 0"):
        ProxySettings(timeout_s=0)
    with pytest.raises(BadInput, match="port 65536"):
        ProxySettings(port=65536)


def test_heartbeat_garbage_is_ignored_and_the_listener_keeps_working(stack):
    proxy = start_proxy(stack)
    garbage = [
        [b"not msgpack at all \xff"],
        [b"\x93\x01\x02\x03"],  # a msgpack array, not a heartbeat
        [ENCODER.encode({"role": "oracle", "http_address": "127.0.0.1:1", "kv_address": None, "model": "m"})],
        [ENCODER.encode({"role": "decode", "http_address": "no-port", "kv_address": None, "model": "m"})],
        [ENCODER.encode({"role": "decode", "http_address": "127.0.0.1:99999", "kv_address": None, "model": "m"})],
        [b"two", b"frames"],
    ]
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"tcp://{proxy.heartbeat_address}")
        for frames in garbage:
            push.send_multipart(frames)
        wait_until(lambda: proxy.listener.rejected == len(garbage), "every bad message is counted")
    prefill = start_backend(stack, "p0", kv_transfer_params=PREFILL_PARAMS)
    decode = start_backend(stack, "d0")
    announce(stack, proxy, "prefill", prefill.address)
    announce(stack, proxy, "decode", decode.address)
    wait_until(lambda: all(registered(proxy.url).values()), "instances still join")
    assert complete(proxy)[0] == 200


def test_models_health_and_instances_report_what_heartbeats_said(stack):
    proxy, (prefill,), (decode,) = cluster(stack)
    extra = start_backend(stack, "d-other")
    announce(stack, proxy, "decode", extra.address, model="other-model")
    wait_until(lambda: len(addresses(proxy, "decode")) == 2, "the other model's decode joins")
    with urllib.request.urlopen(proxy.url + "/v1/models", timeout=5) as response:
        assert [m["id"] for m in json.load(response)["data"]] == ["fake-model", "other-model"]
    with urllib.request.urlopen(proxy.url + "/health", timeout=5) as response:
        assert json.load(response) == {"status": "ok", "prefill": 1, "decode": 2}
    assert registered(proxy.url)["decode"][1] == {
        "role": "decode", "http_address": extra.address, "kv_address": "127.0.0.9:7006", "model": "other-model"}
    status, answer = complete(proxy, {"prompt": "which model?"})
    assert status == 400 and "'model' is required when several are served" in answer["error"]["message"]
    status, answer = complete(proxy, dict(GOOD, model="other-model"))
    assert status == 503 and "no prefill instance of model 'other-model'" in answer["error"]["message"]


class Recording(RoundRobin):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def started(self, address: str) -> None:
        self.calls.append(("started", address))

    def finished(self, address: str) -> None:
        self.calls.append(("finished", address))


def test_the_policy_is_told_when_each_leg_starts_and_finishes(stack):
    policy = Recording()
    proxy, (prefill,), (decode,) = cluster(stack, policy=policy)
    assert complete(proxy)[0] == 200
    p, d = prefill.address, decode.address
    assert policy.calls == [("started", p), ("finished", p), ("started", d), ("finished", d)]

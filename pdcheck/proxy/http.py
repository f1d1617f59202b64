"""The proxy's HTTP face: vLLM's OpenAI API, each request split into a prefill and a decode leg.

Routes: POST /v1/completions and /v1/chat/completions (streaming or not), GET /v1/models (the
models seen in heartbeats), GET /health, GET /instances (the registry in routing order).

A request: the body is checked (400 with an OpenAI-style error naming the field); a prefill and a
decode instance of its model are picked by the policy (503 if a role has none); the prefill leg
gets the same body with stream false, max_tokens (and max_completion_tokens) 1, n 1 (the
prompt's KV is computed once, whatever the number of choices decode samples) and
`kv_transfer_params` = the prefill template, `{decode_addr}` filled with the decode instance's KV
address; the decode leg gets the original body with the `kv_transfer_params` prefill answered,
less accounting keys; decode's answer goes back as it came (SSE passed through chunk by chunk).

One request id (the client's X-Request-Id, else a fresh one) goes to both legs as X-Request-Id.
vLLM 0.32 takes it as the OpenAI id ("cmpl-<id>", "chatcmpl-<id>"), but its engine appends a
random suffix, so the two engines' request ids differ: connectors must match the legs through
`kv_transfer_params`, never through engine request ids.

An instance's 4xx goes back to the client as it is. A connection failure, no answer within
`timeout_s`, a 5xx or an unreadable answer becomes 502 naming the instance. A bad request never
stops the proxy.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from pdcheck.profiles import BUILTIN, REFERENCE_CLASS
from pdcheck.client.legs import ACCOUNTING_KEYS
from pdcheck.proxy.heartbeat import Heartbeat, Instances
from pdcheck.proxy.policies import NoInstance, Policy

REFERENCE_PREFILL_PARAMS = BUILTIN[REFERENCE_CLASS].prefill_params
PREFILL_DROPPED = ("stream_options", "min_tokens")  # vLLM refuses these with stream false, max_tokens 1
UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class Refused(Exception):
    """Ends a request with `response`: an error of the proxy's own, or an instance's 4xx."""

    def __init__(self, response: web.Response):
        super().__init__(response.status)
        self.response = response


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def refuse(status: int, message: str, kind: str = "invalid_request_error") -> Refused:
    return Refused(web.json_response(error_body(status, message, kind), status=status))


def upstream_error(role: str, instance: Heartbeat, why: str) -> Refused:
    return refuse(502, f"{role} instance {instance.http_address}: {why}", "upstream_error")


def parse_body(raw: bytes, required: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise refuse(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise refuse(400, f"request body must be a JSON object, got {type(body).__name__}")
    if body.get(required) is None:
        raise refuse(400, f"'{required}' is required")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise refuse(400, f"'{key}' must be a positive integer, got {value!r}")
    if not isinstance(body.get("stream", False), bool):
        raise refuse(400, f"'stream' must be true or false, got {body['stream']!r}")
    if not isinstance(body.get("kv_transfer_params") or {}, dict):
        raise refuse(400, f"'kv_transfer_params' must be an object, got {body['kv_transfer_params']!r}")
    return body


def fill_prefill_params(template: dict[str, Any], decode: Heartbeat) -> dict[str, Any]:
    needs_kv = any(isinstance(v, str) and "{decode_addr}" in v for v in template.values())
    if needs_kv and decode.kv_address is None:
        raise refuse(503, f"decode instance {decode.http_address} announced no KV address", "service_unavailable")
    return {k: v.replace("{decode_addr}", decode.kv_address) if isinstance(v, str) else v for k, v in template.items()}


def prefill_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    leg = dict(body, stream=False, max_tokens=1, n=1, kv_transfer_params=params | (body.get("kv_transfer_params") or {}))
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    for key in PREFILL_DROPPED:
        leg.pop(key, None)
    return leg


def decode_params(prefill_answer: bytes, prefill: Heartbeat) -> dict[str, Any] | None:
    try:
        answer = json.loads(prefill_answer)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise upstream_error("prefill", prefill, "answer is not a JSON object")
    params = answer.get("kv_transfer_params")
    return {k: v for k, v in params.items() if k not in ACCOUNTING_KEYS} if isinstance(params, dict) else None


def sse_error(message: str) -> bytes:
    return f"data: {json.dumps(error_body(502, message, 'upstream_error'))}\n\n".encode()


class ProxyApp:
    """Handlers and upstream calls; `app()` builds the aiohttp application, which owns the one
    shared ClientSession (opened on startup, closed on cleanup)."""

    def __init__(self, instances: Instances, policy: Policy, prefill_params: dict[str, Any] | None = None,
                 timeout_s: float = 30.0):
        self.instances, self.policy, self.timeout_s = instances, policy, timeout_s
        self.prefill_params = dict(REFERENCE_PREFILL_PARAMS if prefill_params is None else prefill_params)
        self.client: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[refusals])
        app.cleanup_ctx.append(self.client_session)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/instances", self.list_instances)
        return app

    async def client_session(self, _app):
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as client:
            self.client = client
            yield

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, "/v1/completions", "prompt")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, "/v1/chat/completions", "messages")

    async def models(self, _request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "pdcheck"} for m in self.instances.models()]
        return web.json_response({"object": "list", "data": data})

    async def health(self, _request: web.Request) -> web.Response:
        counts = {role: len(members) for role, members in self.instances.snapshot().items()}
        return web.json_response({"status": "ok", **counts})

    async def list_instances(self, _request: web.Request) -> web.Response:
        return web.json_response(self.instances.snapshot())

    async def serve(self, request: web.Request, path: str, required: str) -> web.StreamResponse:
        body = parse_body(await request.read(), required)
        model = self.resolve_model(body.get("model"))
        prefill, decode = self.pick("prefill", model), self.pick("decode", model)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"X-Request-Id": request_id, "Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        leg = prefill_body(body, fill_prefill_params(self.prefill_params, decode))
        answer = await self.leg("prefill", prefill, path, leg, headers)
        decode_body = dict(body, kv_transfer_params=decode_params(answer, prefill))
        if body.get("stream"):
            return await self.stream_leg(request, decode, path, decode_body, headers)
        answer = await self.leg("decode", decode, path, decode_body, headers)
        return web.Response(body=answer, content_type="application/json", headers={"X-Request-Id": request_id})

    def resolve_model(self, model: Any) -> str:
        served = self.instances.models()
        if not served:
            raise refuse(503, "no instance is registered", "service_unavailable")
        if model is None and len(served) == 1:
            return served[0]
        if model is None:
            raise refuse(400, f"'model' is required when several are served: {', '.join(served)}")
        if model not in served:
            raise refuse(400, f"model {model!r} is not served; served: {', '.join(served)}")
        return model

    def pick(self, role: str, model: str) -> Heartbeat:
        try:
            address = self.policy.pick(role, self.instances.addresses(role, model))
        except NoInstance:
            raise refuse(503, f"no {role} instance of model {model!r} is registered", "service_unavailable") from None
        return self.instances.get(role, address)

    async def leg(self, role: str, instance: Heartbeat, path: str, body: dict, headers: dict) -> bytes:
        """One non-streaming call: the answer's bytes if it is 200, else Refused."""
        self.policy.started(instance.http_address)
        try:
            async with self.client.post(f"http://{instance.http_address}{path}", data=json.dumps(body).encode(),
                                        headers=headers) as upstream:
                answer = await upstream.read()
        except UPSTREAM_FAILURES as e:
            raise upstream_error(role, instance, describe(e, self.timeout_s)) from None
        finally:
            self.policy.finished(instance.http_address)
        check_status(role, instance, upstream.status, answer)
        return answer

    async def stream_leg(self, request: web.Request, decode: Heartbeat, path: str, body: dict,
                         headers: dict) -> web.StreamResponse:
        self.policy.started(decode.http_address)
        try:
            async with self.client.post(f"http://{decode.http_address}{path}", data=json.dumps(body).encode(),
                                        headers=headers) as upstream:
                if upstream.status != 200:
                    check_status("decode", decode, upstream.status, await upstream.read())
                return await self.relay(request, upstream, decode, headers["X-Request-Id"])
        except UPSTREAM_FAILURES as e:
            raise upstream_error("decode", decode, describe(e, self.timeout_s)) from None
        finally:
            self.policy.finished(decode.http_address)

    async def relay(self, request: web.Request, upstream: aiohttp.ClientResponse, decode: Heartbeat,
                    request_id: str) -> web.StreamResponse:
        """Pass decode's stream through chunk by chunk; a failure mid-stream ends it with an
        SSE error event (the 200 status is already sent)."""
        content_type = upstream.headers.get("Content-Type", "text/event-stream")
        response = web.StreamResponse(headers={"Content-Type": content_type, "X-Request-Id": request_id})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except ConnectionResetError:  # the client left; closing upstream aborts the request there
            return response
        except UPSTREAM_FAILURES as e:
            why = describe(e, self.timeout_s)
            await response.write(sse_error(f"decode instance {decode.http_address}: {why}"))
        await response.write_eof()
        return response


def check_status(role: str, instance: Heartbeat, status: int, answer: bytes) -> None:
    if 400 <= status < 500:
        raise Refused(web.Response(status=status, body=answer, content_type="application/json"))
    if status != 200:
        snippet = answer[:200].decode(errors="replace")
        raise upstream_error(role, instance, f"answered HTTP {status}: {snippet}")


def describe(error: BaseException, timeout_s: float) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"no answer within {timeout_s} s"
    return f"{type(error).__name__}: {error}"


@web.middleware
async def refusals(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as e:
        return e.response

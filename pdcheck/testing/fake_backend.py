"""`FakeBackend`: a stand-in vLLM HTTP server, for the proxy's tests (tests/test_http_proxy.py)
and its bench (`pdcheck bench proxy`).

It records every request it gets (path, headers, body) and answers like vLLM 0.32's OpenAI
server, at once: the completion, or SSE chunks (one per word) ending in `data: [DONE]`, with a
top-level `kv_transfer_params`; a prompt longer than `max_prompt_len` gets vLLM's 400.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from pdcheck.proxy.server import AppThread


class FakeBackend:
    """A stand-in vLLM server on a loopback port, started and stopped by its owner (or `with`)."""

    def __init__(self, name: str, text: str = "a fixed completion from the fake backend",
                 kv_transfer_params: dict[str, Any] | None = None, max_prompt_len: int = 10_000):
        self.name, self.text, self.max_prompt_len = name, text, max_prompt_len
        self.kv_transfer_params = kv_transfer_params
        self.received: list[tuple[str, CIMultiDict[str], dict[str, Any]]] = []
        app = web.Application()
        app.router.add_post("/v1/completions", self.answer)
        app.router.add_post("/v1/chat/completions", self.answer)
        self.server = AppThread(app, name=f"pdcheck-fake-{name}", grace_s=0.1)

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def start(self) -> FakeBackend:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> FakeBackend:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, _, body in self.received]

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, CIMultiDict(request.headers), body))
        if len(str(body.get("prompt", ""))) > self.max_prompt_len:
            message = f"This model's maximum context length is {self.max_prompt_len} tokens."
            error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error}, status=400)
        chat = request.path.endswith("/chat/completions")
        request_id = request.headers.get("X-Request-Id", "none")
        if body.get("stream"):
            return await self.stream(request, chat, request_id)
        choice = {"index": 0, "finish_reason": "length"}
        choice |= {"message": {"role": "assistant", "content": self.text}} if chat else {"text": self.text}
        return web.json_response({"id": f"cmpl-{request_id}", "model": body.get("model"), "choices": [choice],
                                  "kv_transfer_params": self.kv_transfer_params})

    def chunks(self, chat: bool, request_id: str) -> list[bytes]:
        pieces = [w + " " for w in self.text.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        choices = [{"index": 0, "delta": {"content": p}} if chat else {"index": 0, "text": p} for p in pieces]
        events = [json.dumps({"id": f"cmpl-{request_id}", "choices": [c]}) for c in choices]
        return [f"data: {e}\n\n".encode() for e in [*events, "[DONE]"]]

    async def stream(self, request: web.Request, chat: bool, request_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in self.chunks(chat, request_id):
            await response.write(chunk)
        await response.write_eof()
        return response

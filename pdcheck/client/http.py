"""The OpenAI completions API as a GenRequest -> GenResult call, streaming or not.

Prompts go as token ids; responses carry token ids (`return_token_ids`), the sampled tokens'
logprobs and the top alternatives named `token_id:N` (`return_tokens_as_token_ids`), and the
cached-token count (`prompt_tokens_details`, with `--enable-prompt-tokens-details`). A 4xx/5xx
answer becomes a result with `error`; no answer by the deadline, one with `hung`.

The standard library's urllib is enough for one blocking request per thread, which is how the
gate drives instances; `complete_all` runs a batch on a thread pool.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pdcheck.types import EngineState, GenRequest, GenResult, PDResult


def body(request: GenRequest, model: str, stream: bool) -> dict:
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
               "logprobs": request.num_logprobs, "return_token_ids": True, "return_tokens_as_token_ids": True,
               "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if request.kv_transfer_params:
        payload["kv_transfer_params"] = request.kv_transfer_params
    return payload


def complete(url: str, model: str, request: GenRequest, stream: bool = False, timeout_s: float = 60.0) -> GenResult:
    """POST one request to `url`/v1/completions; the request id goes as X-Request-Id."""
    data = json.dumps(body(request, model, stream)).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request.request_id}
    http = urllib.request.Request(f"{url}/v1/completions", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(http, timeout=timeout_s) as response:
            chunks = list(events(response)) if stream else [json.loads(response.read())]
    except urllib.error.HTTPError as e:
        return GenResult(request_id=request.request_id, error=f"HTTP {e.code}: {error_message(e.read())}")
    except TimeoutError:
        return GenResult(request_id=request.request_id, hung=True, error=f"no answer within {timeout_s}s")
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        return GenResult(request_id=request.request_id, error=f"{url}: {e}")
    return joined(request.request_id, chunks)


def complete_all(url: str, model: str, requests: list[GenRequest], stream: bool = False,
                 timeout_s: float = 60.0) -> list[GenResult]:
    """All requests at once, results in request order."""
    with ThreadPoolExecutor(max(1, len(requests))) as pool:
        return list(pool.map(lambda r: complete(url, model, r, stream, timeout_s), requests))


def events(response):
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def joined(request_id: str, chunks: list[dict]) -> GenResult:
    """One result from a response, or from a stream's chunks in order."""
    result = GenResult(request_id=request_id, cached_tokens_reported=False)
    for chunk in chunks:
        if "error" in chunk:
            return GenResult(request_id=request_id, error=f"stream error: {error_message(json.dumps(chunk).encode())}")
        for choice in chunk.get("choices", []):
            result.token_ids += choice.get("token_ids") or []
            logprobs = choice.get("logprobs") or {}
            result.logprobs += logprobs.get("token_logprobs") or []
            result.top_logprobs += [{int(k.removeprefix("token_id:")): v for k, v in top.items()}
                                    for top in logprobs.get("top_logprobs") or []]
        details = (chunk.get("usage") or {}).get("prompt_tokens_details")
        if details is not None:
            result.num_cached_tokens, result.cached_tokens_reported = details.get("cached_tokens") or 0, True
        if chunk.get("kv_transfer_params") is not None:
            result.kv_transfer_params = chunk["kv_transfer_params"]
    return result


def error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]


def engine_state(url: str) -> EngineState | None:
    """What a vLLM server holds, from its Prometheus metrics; None if they cannot be read."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
            values[name] = values.get(name, 0.0) + float(line.rpartition(" ")[2])
    return EngineState(kv_cache_usage=values.get("vllm:kv_cache_usage_perc", 0.0),
                       running=int(values.get("vllm:num_requests_running", 0)),
                       waiting=int(values.get("vllm:num_requests_waiting", 0)))


class ProxyClient:
    """Requests through a PD proxy at `url`, whole or streamed: the proxy picks each pair and
    joins the legs, so decode's cached-token count is what was loaded."""

    def __init__(self, url: str, model: str, stream: bool = False):
        self.url, self.model, self.stream = url, model, stream

    def pair(self, batch: int) -> None:
        return None

    def send(self, requests: list[GenRequest], batch: int, deadline_s: float, between=None) -> list[PDResult]:
        if between is not None:
            raise ValueError("the proxy sends both legs: nothing can run between them from here")
        results = complete_all(self.url, self.model, requests, self.stream, timeout_s=deadline_s)
        return [PDResult.served(r) for r in results]

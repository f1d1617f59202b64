"""An OpenAI-compatible endpoint pdcheck did not start: checked before any load is sent.

`probe` reads /v1/models (read-only) and refuses, as BadInput, a URL that does not answer, an
answer that is not the OpenAI model list, and a model the endpoint does not serve. Every
completion sent through an Endpoint first asks its Budget, which refuses to pass the run's
request budget and spaces requests to the rate limit.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pdcheck.client.http import complete_all, engine_state
from pdcheck.errors import BadInput
from pdcheck.types import EngineState, GenRequest, GenResult, PDResult

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Prefill computes the prompt's cache; decode "
    "generates the rest, one token after another. 0123456789 ,.;:!? Zwölf Boxkämpfer jagen Viktor "
    "quer über den großen Sylter Deich. Portez ce vieux whisky au juge blond qui fume."
)


class Budget:
    """At most `max_requests` completions in all, at most `rate` per second."""

    def __init__(self, max_requests: int, rate: float):
        if max_requests <= 0 or rate <= 0:
            raise BadInput(f"request budget {max_requests} and rate {rate}: both must be positive")
        self.max_requests, self.interval = max_requests, 1.0 / rate
        self.used, self.next_at = 0, time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int = 1) -> None:
        with self.lock:
            if self.used + n > self.max_requests:
                raise BadInput(f"the run would send more than its budget of {self.max_requests} requests")
            self.used += n
            wait = []
            for _ in range(n):
                wait.append(max(0.0, self.next_at - time.monotonic()))
                self.next_at = max(self.next_at, time.monotonic()) + self.interval
        time.sleep(max(wait))


@dataclass
class Endpoint:
    name: str  # "target" or "oracle", for messages
    url: str
    budget: Budget
    model: str = ""
    max_model_len: int | None = None

    def probe(self) -> list[str]:
        """The models served; BadInput if this is not a reachable OpenAI-compatible server."""
        listing = self.get_json("/v1/models")
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise BadInput(f"{self.name} {self.url}: /v1/models is not an OpenAI model list: {str(listing)[:200]}")
        models = {m.get("id"): m for m in listing["data"] if isinstance(m, dict)}
        if self.model:
            if self.model not in models:
                raise BadInput(f"{self.name} {self.url} does not serve model {self.model!r} (it serves {sorted(models)})")
            self.max_model_len = models[self.model].get("max_model_len")
        return sorted(models)

    def get_json(self, path: str, data: dict | None = None):
        body = json.dumps(data).encode() if data is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise BadInput(f"{self.name} {self.url}: {path} answered HTTP {e.code} "
                           f"(not an OpenAI-compatible server, or not vLLM's)") from None
        except (urllib.error.URLError, OSError) as e:
            raise BadInput(f"{self.name} {self.url}: not reachable ({getattr(e, 'reason', e)})") from None
        except json.JSONDecodeError:
            raise BadInput(f"{self.name} {self.url}{path}: the answer is not JSON (not an OpenAI-compatible server?)") from None

    def token_pool(self) -> list[int]:
        """Real token ids of this model, from the server's /tokenize endpoint."""
        answer = self.get_json("/tokenize", {"model": self.model, "prompt": SAMPLE_TEXT})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not tokens:
            raise BadInput(f"{self.name} {self.url}/tokenize gave no tokens; name a local tokenizer with --tokenizer")
        return sorted(set(tokens))

    def generate(self, requests: list[GenRequest], deadline_s: float, stream: bool = False) -> list[GenResult]:
        self.budget.take(len(requests))
        return complete_all(self.url, self.model, requests, stream, deadline_s)


def local_token_pool(tokenizer: str) -> list[int]:
    from transformers import AutoTokenizer

    try:
        ids = AutoTokenizer.from_pretrained(tokenizer)(SAMPLE_TEXT)["input_ids"]
    except (OSError, ValueError) as e:
        raise BadInput(f"--tokenizer {tokenizer!r}: cannot load it ({e})") from None
    return sorted(set(ids))


def engine_states(urls: list[str]) -> dict[str, EngineState | None]:
    return {url: engine_state(url) for url in urls}


class RemoteTarget:
    """The deployment under test as a cluster (pdcheck.cluster.Cluster) that pdcheck did not
    start: it owns no process, so there is nothing to revive, and nothing for a configuration's
    drain to ask (the servers' metrics are asked once, after the whole run). Requests go to its
    endpoint; each hook runs before the request it names, counted across the run."""

    topology = "remote"
    spec = None
    instances = ()

    def __init__(self, endpoint: Endpoint, oracle: Endpoint, hooks):
        self.endpoint, self.oracle, self.hooks = endpoint, oracle, hooks
        self.sent = 0

    def client(self, stream: bool = False) -> EndpointClient:
        return EndpointClient(self, stream)

    def transfers(self) -> dict:
        return {}

    def revive(self) -> None:
        pass


class EndpointClient:
    """Requests to the target's endpoint as its clients send them, whole or streamed; what it
    reports as cached is what decode loaded, where it reports it."""

    def __init__(self, target: RemoteTarget, stream: bool):
        self.target, self.stream = target, stream

    def pair(self, batch: int) -> None:
        return None

    def send(self, requests: list[GenRequest], batch: int, deadline_s: float, between=None) -> list[PDResult]:
        start, self.target.sent = self.target.sent, self.target.sent + len(requests)
        self.target.hooks.before(range(start, start + len(requests)))
        results = self.target.endpoint.generate(requests, deadline_s, self.stream)
        return [PDResult.served(r) for r in results]

"""Field-by-field comparison of two OpenAI API answers to the same request: PD's and the oracle's.

`send` posts an ApiCase and returns the answer as one JSON object: a stream's chunks are merged
per choice (text and lists joined, the last finish_reason and usage kept), an HTTP error becomes
{"error": {"status": ..., "message": ...}}. `differences` walks both answers and names every
field that differs: keys present on one side only, lists of other lengths, numbers further apart
than the tolerance (logprobs), any other value not equal. Fields that differ between any two
servers by design are left out (ids, timestamps, the connector's transfer parameters, cached-token
details).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pdcheck.client.http import events
from pdcheck.types import Outcome
from pdcheck.workload.api import ApiCase

IGNORED = frozenset({"id", "created", "system_fingerprint", "kv_transfer_params", "prompt_tokens_details",
                     "service_tier"})
SHOWN = 4  # differences named per answer
FLOOR = 1e-4  # the least logprob tolerance: PD computes the prompt's last token apart from the rest


def send(url: str, case: ApiCase, timeout_s: float = 60.0) -> dict[str, Any]:
    data = json.dumps(case.body).encode()
    request = urllib.request.Request(f"{url}{case.path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Id": f"api-{case.name}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return merged(list(events(response))) if case.body.get("stream") else json.loads(response.read())
    except urllib.error.HTTPError as e:
        return {"error": {"status": e.code, "message": e.read().decode(errors="replace")[:300]}}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"error": {"status": None, "message": f"{url}: {e}"}}


def merged(chunks: list[dict]) -> dict[str, Any]:
    """One answer from a stream's chunks: each choice's deltas joined in order."""
    answer: dict[str, Any] = {"choices": {}}
    for chunk in chunks:
        if "error" in chunk:
            return {"error": {"status": "in stream", "message": json.dumps(chunk["error"])[:300]}}
        for choice in chunk.get("choices", []):
            answer["choices"][choice["index"]] = join(answer["choices"].get(choice["index"]), choice)
        if chunk.get("usage"):
            answer["usage"] = chunk["usage"]
        answer.update({k: v for k, v in chunk.items() if k not in ("choices", "usage")})
    answer["choices"] = [answer["choices"][i] for i in sorted(answer["choices"])]
    return answer


def join(before: Any, delta: Any) -> Any:
    """`delta` appended to `before`: strings and lists joined, objects key by key, nulls keep
    what was there, anything else replaced."""
    if before is None:
        return delta
    if delta is None:
        return before
    if isinstance(before, dict) and isinstance(delta, dict):
        return {k: join(before.get(k), delta.get(k)) for k in before.keys() | delta.keys()}
    if isinstance(before, (str, list)) and type(before) is type(delta):
        return before + delta
    return delta


def differences(expected: Any, got: Any, tolerance: float, path: str = "") -> list[str]:
    """Every field where `got` (PD) differs from `expected` (the oracle), by path."""
    if isinstance(expected, dict) and isinstance(got, dict):
        found = []
        for key in sorted((expected.keys() | got.keys()) - IGNORED, key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in got or key not in expected:
                side = "PD" if key not in got else "the oracle"
                found.append(f"{where}: missing from {side}'s answer")
            else:
                found += differences(expected[key], got[key], tolerance, where)
        return found
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(got)} entries, the oracle's has {len(expected)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in differences(e, g, tolerance, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if abs(expected - got) <= tolerance else [f"{path}: {got!r}, the oracle's {expected!r}"]
    return [] if expected == got else [f"{path}: {got!r}, the oracle's {expected!r}"]


def compare(case: ApiCase, expected: dict, got: dict, tolerance: float) -> tuple[Outcome, str]:
    """MATCH with "" when the answers agree; else ERROR (PD failed where the oracle did not) or
    DIVERGED, with a line naming the case and its first differences."""
    if "error" in got and "error" not in expected:
        return Outcome.ERROR, f"{case.name}: error: PD answered {got['error']['status']}: {got['error']['message']}"
    found = differences(expected, got, tolerance)
    if not found:
        return Outcome.MATCH, ""
    more = f" (and {len(found) - SHOWN} more)" if len(found) > SHOWN else ""
    return Outcome.DIVERGED, f"{case.name}: diverged: " + "; ".join(found[:SHOWN]) + more

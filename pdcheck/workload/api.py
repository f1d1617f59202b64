"""The API-fidelity workload: one request per sampling or output option a client can set, sent
through the PD deployment and to the oracle and compared field by field (pdcheck.checker.api).

The cases are made from the oracle's greedy answer to a plain request (`PROBE`), so the stop
string and the stop token are ones the model really produces a few tokens in. Every prompt is
longer than a few KV blocks, so each case has KV to move.
"""

from __future__ import annotations

from typing import Any

import msgspec

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = (
    "The quick brown fox jumps over the lazy dog. Prefill computes the prompt's cache; decode "
    "generates the rest, one token after another. 0123456789 ,.;:!? Portez ce vieux whisky au juge "
    "blond qui fume. Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich."
)
MESSAGES = [{"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": PROMPT}]
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


class ApiCase(msgspec.Struct, frozen=True):
    """`loads`: False where vLLM has decode compute the whole prompt by design: prompt logprobs
    (asked for, or implied by echo with logprobs) need every prompt position, so vLLM reads no
    cached or external KV for them (SamplingParams.skip_reading_prefix_cache)."""

    name: str
    path: str
    body: dict[str, Any]
    loads: bool = True


def probe(model: str) -> ApiCase:
    """The plain greedy request the other cases are made from."""
    return ApiCase("greedy", COMPLETIONS, {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                           "return_token_ids": True})


def api_cases(model: str, probe_answer: dict, seed: int = 0) -> list[ApiCase]:
    """Every case, the probe's first; `probe_answer` is the oracle's answer to `probe(model)`."""
    choice = probe_answer["choices"][0]
    text, tokens = choice["text"], choice["token_ids"]
    stop = text[len(text) // 2:][:3].strip() or text[-3:]
    completion = {"model": model, "prompt": PROMPT, "max_tokens": 16}
    sampled = {"temperature": 0.9, "seed": seed}
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    cases = {
        "greedy-logprobs": dict(completion, temperature=0, logprobs=5),
        "n2-seeded": dict(completion, n=2, logprobs=2, **sampled),
        "n3-seeded-streamed": dict(completion, n=3, **sampled, **STREAM),
        "sampling-options": dict(completion, temperature=1.2, top_p=0.9, top_k=40, min_p=0.02, seed=seed + 1,
                                 presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, max_tokens=24),
        "prompt-logprobs": dict(completion, temperature=0, prompt_logprobs=2, max_tokens=4),
        "echo": dict(completion, temperature=0, echo=True, logprobs=1, max_tokens=4),
        "stop-string": dict(completion, temperature=0, stop=[stop]),
        "stop-token-id": dict(completion, temperature=0, stop_token_ids=[tokens[len(tokens) // 2]]),
        "max-tokens-1": dict(completion, temperature=0, logprobs=3, max_tokens=1),
        "min-tokens-ignore-eos": dict(completion, temperature=0, min_tokens=8, ignore_eos=True, max_tokens=8),
        "streamed-usage": dict(completion, temperature=0, logprobs=1, **STREAM),
        "chat": dict(chat, logprobs=True, top_logprobs=3, **sampled),
        "chat-streamed": dict(chat, temperature=0, **STREAM),
        "chat-n2": dict(chat, n=2, **sampled),
    }
    return [probe(model)] + [ApiCase(name, CHAT if name.startswith("chat") else COMPLETIONS, body,
                                     loads=name not in ("prompt-logprobs", "echo"))
                             for name, body in cases.items()]


def case_names() -> list[str]:
    """The cases' names, known before any probe is answered (for test ids)."""
    return [case.name for case in api_cases("", {"choices": [{"text": "", "token_ids": [0]}]})]

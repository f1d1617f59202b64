"""The API answer comparison (pdcheck.checker.api): streams merged per choice, every differing
field named by its path, fields that differ by design left out."""

from __future__ import annotations

from pdcheck.checker.api import compare, differences, merged
from pdcheck.types import Outcome
from pdcheck.workload.api import ApiCase, api_cases, case_names

CASE = ApiCase("n2-seeded", "/v1/completions", {})


def answer(texts: list[str], logprob: float = -1.25, cached: int = 0) -> dict:
    return {"id": "cmpl-x", "created": 1, "model": "m",
            "choices": [{"index": i, "text": t, "finish_reason": "length", "logprobs": {"token_logprobs": [logprob]}}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": cached}},
            "kv_transfer_params": {"transfer_key": "k"}}


def test_equal_answers_match_whatever_their_ids_timestamps_transfer_params_and_cached_tokens():
    assert compare(CASE, answer(["a b", "c d"]), answer(["a b", "c d"], cached=39) | {"id": "other"}, 1e-4) == (
        Outcome.MATCH, "")


def test_each_differing_field_is_named_by_its_path():
    expected, got = answer(["a b", "c d"]), answer(["a b", "c x"], logprob=-1.5)
    got["choices"][1]["finish_reason"] = "stop"
    found = differences(expected, got, 1e-4)
    assert found == ["choices[0].logprobs.token_logprobs[0]: -1.5, the oracle's -1.25",
                     "choices[1].finish_reason: 'stop', the oracle's 'length'",
                     "choices[1].logprobs.token_logprobs[0]: -1.5, the oracle's -1.25",
                     "choices[1].text: 'c x', the oracle's 'c d'"]
    assert differences(answer(["a"], -1.25), answer(["a"], -1.25 + 5e-5), 1e-4) == []


def test_a_missing_choice_or_field_and_an_error_are_reported():
    outcome, detail = compare(CASE, answer(["a", "b"]), answer(["a"]), 1e-4)
    assert outcome is Outcome.DIVERGED and "choices: 1 entries, the oracle's has 2" in detail
    del (got := answer(["a"]))["usage"]
    assert differences(answer(["a"]), got, 1e-4) == ["usage: missing from PD's answer"]
    outcome, detail = compare(CASE, answer(["a"]), {"error": {"status": 502, "message": "unknown transfer key"}}, 1e-4)
    assert outcome is Outcome.ERROR and detail == "n2-seeded: error: PD answered 502: unknown transfer key"


def test_a_stream_is_merged_per_choice_in_order_with_its_last_usage():
    chunks = [{"id": "c", "choices": [{"index": 1, "text": "x", "finish_reason": None, "logprobs": {"tokens": ["x"]}}]},
              {"id": "c", "choices": [{"index": 0, "text": "a", "finish_reason": None}]},
              {"id": "c", "choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]},
              {"id": "c", "choices": [{"index": 1, "text": "y", "finish_reason": "length", "logprobs": {"tokens": ["y"]}}]},
              {"id": "c", "choices": [], "usage": {"completion_tokens": 4}}]
    assert merged(chunks) == {"id": "c", "usage": {"completion_tokens": 4}, "choices": [
        {"index": 0, "text": "ab", "finish_reason": "stop"},
        {"index": 1, "text": "xy", "finish_reason": "length", "logprobs": {"tokens": ["x", "y"]}}]}


def test_cases_take_their_stop_string_and_token_from_the_probe_answer():
    cases = {c.name: c for c in api_cases("m", {"choices": [{"text": "hello world", "token_ids": [5, 6, 7, 8]}]})}
    assert list(cases) == case_names()
    assert cases["stop-string"].body["stop"] == ["wo"] and cases["stop-token-id"].body["stop_token_ids"] == [7]
    assert cases["chat"].path == "/v1/chat/completions" and cases["n2-seeded"].body["n"] == 2

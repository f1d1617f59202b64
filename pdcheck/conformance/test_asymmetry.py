"""Prefill and decode started with settings that disagree: block size, dtype, max_model_len.

Field reports: wrong output with prefill TP2 and decode TP1 (TensorRT-LLM #6507); block size 128
against 16 (vLLM #42895); FP8 KV on one side (vLLM #42179): the two sides disagree on layout,
block size or dtype and nothing checks. Each request must end as a clean error, recomputed, or
(where the connector converts what it moves) with the oracle's tokens: never from KV read in
another shape. KV of another dtype may not be loaded at all (the oracle's dtype cannot judge a
conversion). Nothing may be held after the drain.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdcheck.config import DTYPES
from pdcheck.conformance.battery import prompts, replay_line, run
from pdcheck.profiles import FailureClass
from pdcheck.report.terminal import failure_line
from pdcheck.types import Outcome

FAILURE_CLASS = FailureClass.ASYMMETRY
LENGTHS = [65, 129]
DECODE_SIDE = {  # what decode is started with, prefill keeping the spec's
    "block-size": lambda spec: {"block_size": spec.block_size * 2},  # on CPU, a multiple of 32
    "dtype": lambda spec: {"dtype": next(d for d in DTYPES if d != spec.dtype)},
    "max-model-len": lambda spec: {"max_model_len": spec.max_model_len * 2},
}
CLEAN = {Outcome.MATCH, Outcome.ERROR, Outcome.FALLBACK, Outcome.PARTIAL}


@pytest.mark.vllm
@pytest.mark.parametrize("setting", ["block-size", "dtype", pytest.param("max-model-len", marks=pytest.mark.slow)])
def test_sides_that_disagree_fail_cleanly_or_match(setting, spec, pd_pool, pd_history, request):
    decode = dataclasses.replace(spec, **DECODE_SIDE[setting](spec))
    result = run(pd_pool, pd_history, spec, prompts(spec, LENGTHS, f"asymmetric-{setting}"), concurrency=2,
                 decode_spec=decode)
    if setting == "dtype":
        bad = [f"{failure_line(c)} (loaded {c.external_tokens} tokens of {spec.dtype} KV into a {decode.dtype} cache)"
               for c in result.checked if c.external_tokens > 0 and c.verdict.outcome is not Outcome.ERROR]
        bad += [failure_line(c) for c in result.checked if c.verdict.outcome is Outcome.HANG]
    else:
        bad = [failure_line(c) for c in result.checked if c.verdict.outcome not in CLEAN]
    bad += [failure_line(c) for c in result.checked if c.leak] + [f"leak after drain: {leak}" for leak in result.leaked]
    assert not bad, "\n".join([*bad, replay_line(request, spec)])

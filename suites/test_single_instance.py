"""Single-instance mode (pdcheck/single.py) on a real engine: ExampleConnector used as a store on
one instance. Prompts of 127, 128 and 130 tokens are read back after the fillers evicted them and
match the oracle; every 129-token prompt (k x 32 + 1) is a fallback, saved under a hash of its
first 128 tokens and looked up under one of its first 96 (example_connector.py:50 and :408): the
mode passes what works and catches that defect."""

from __future__ import annotations

import pytest

from pdcheck.config import EngineSpec, connector_spec, model_path
from pdcheck.single import NUM_BLOCKS, failure_lines, run


@pytest.mark.vllm
def test_example_connector_as_a_store_reads_back_all_but_the_block_plus_one_prompts(tmp_path):
    spec = EngineSpec(model=model_path("tiny-llama"), dtype="float32", connector=connector_spec("ExampleConnector"),
                      prefix_caching=True, num_blocks=NUM_BLOCKS)
    results = run(spec, tmp_path)
    checked = {c.verdict.request_id: c for result in results for c in result.requests}
    repeats = {rid: (c.outcome, c.external_tokens, c.local_tokens) for rid, c in checked.items()
               if rid.endswith(("-again", "-third"))}
    assert {rid for rid, (outcome, *_) in repeats.items() if outcome != "match"} == {
        "first-len129-again", "filler-0-again"}, repeats  # the two 129-token prompts: never read back
    assert all(outcome == "fallback" for rid, (outcome, *_) in repeats.items() if "129" in rid or "filler" in rid)
    assert all(read + local > 0 for rid, (_, read, local) in repeats.items() if rid.startswith("first-")
               and "129" not in rid), repeats
    assert not [r for r in results if r.leaks], failure_lines(results)

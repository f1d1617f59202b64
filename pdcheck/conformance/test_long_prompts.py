"""Long prompts: a model length that allows prompts of over a thousand tokens, prefilled in
chunks (256 tokens a step on prefill), so a request's KV is written over several steps and
spans dozens of blocks before it moves. The embedded models allow 512 positions; the test
runs a copy whose config allows MAX_MODEL_LEN (the weights are the same: RoPE has none)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pdcheck.conformance.battery import prompts, run, verdict
from pdcheck.profiles import FailureClass

FAILURE_CLASS = FailureClass.LONG_PROMPTS
MAX_MODEL_LEN, CHUNK = 1280, 256
LENGTHS = [1023, 1024, 1025, 1200]


def longer_model(model: Path, folder: Path) -> Path:
    """A copy of `model` whose config allows MAX_MODEL_LEN positions (its files linked)."""
    copy = folder / f"{model.name}-{MAX_MODEL_LEN}"
    if not copy.exists():
        copy.mkdir(parents=True)
        for item in model.iterdir():
            if item.name != "config.json":
                (copy / item.name).symlink_to(item)
        config = json.loads((model / "config.json").read_text())
        config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), MAX_MODEL_LEN)
        (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


@pytest.mark.vllm
def test_long_prompts_prefilled_in_chunks_match(spec, pd_pool, pd_history, pd_run_dir, request):
    model = longer_model(spec.model, pd_run_dir / "models")
    long = dataclasses.replace(spec, model=model, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=CHUNK)
    decode = dataclasses.replace(long, max_num_batched_tokens=None)
    result = run(pd_pool, pd_history, long, prompts(long, LENGTHS, "long"), concurrency=2, decode_spec=decode)
    assert not verdict(result, request, spec), verdict(result, request, spec)

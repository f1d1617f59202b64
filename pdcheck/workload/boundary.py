"""Seeded prompts whose lengths sit around block boundaries: b-1, b, b+1, 2b-1, 2b, 2b+1, ...

Connectors move KV in whole blocks, so partial last blocks and exact multiples of the block
size are where off-by-one slicing shows. Prompts are random token ids from one seeded RNG.
"""

from __future__ import annotations

import json
import random

from pdcheck.types import GenRequest

FIRST_ORDINARY_TOKEN = 4  # ids 0-3 are <pad> <s> </s> <unk>


def boundary_lengths(block_size: int, max_prompt_len: int) -> list[int]:
    lengths = []
    for k in range(1, max_prompt_len // block_size + 2):
        lengths += [k * block_size - 1, k * block_size, k * block_size + 1]
    return [n for n in lengths if 0 < n <= max_prompt_len]


def boundary_requests(
    seed: int, block_size: int, max_model_len: int, max_tokens: int, vocab_size: int, prefix: str = "r"
) -> list[GenRequest]:
    """One request per boundary length that leaves room for max_tokens in the model length."""
    rng = random.Random(seed)
    requests = []
    for n in boundary_lengths(block_size, max_model_len - max_tokens):
        prompt = [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(n)]
        requests.append(GenRequest(request_id=f"{prefix}-len{n}", prompt=prompt, max_tokens=max_tokens))
    return requests


def boundary_workload(spec, seed: int = 0, max_tokens: int = 16) -> list[GenRequest]:
    """The block-boundary workload for an EngineSpec's model, block size and model length."""
    vocab = json.loads((spec.model / "config.json").read_text())["vocab_size"]
    return boundary_requests(seed, spec.block_size, spec.max_model_len, max_tokens, vocab)


def repeated_requests(seed: int, prompt_len: int, repeats: int, max_tokens: int, vocab_size: int) -> list[GenRequest]:
    """The same prompt `repeats` times under distinct request ids (vLLM #22965's trigger)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(prompt_len)]
    return [GenRequest(request_id=f"rep{i}-len{prompt_len}", prompt=prompt, max_tokens=max_tokens) for i in range(repeats)]

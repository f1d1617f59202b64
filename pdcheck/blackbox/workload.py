"""The black-box workload: seeded phases of prompts made of the target's own token ids.

Prompts are sent as token ids, so their lengths are exact in the target's tokens whatever its
tokenizer: block-boundary lengths land on real block boundaries. Phases: block boundaries
(whole answers, then the same prompts streamed), the same prompt repeated (one after another, then all at once), prompts sharing a prefix of
whole blocks, a burst of mixed lengths at once, and prompts as long as the model allows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdcheck.errors import BadInput
from pdcheck.types import GenRequest
from pdcheck.workload.boundary import boundary_lengths

REPEATS = 6
BURST = 8


@dataclass(frozen=True)
class Phase:
    name: str
    requests: list[GenRequest]
    concurrent: bool = False
    stream: bool = False


def phases(pool: list[int], seed: int, block_size: int, max_model_len: int, max_tokens: int) -> list[Phase]:
    rng = random.Random(seed)
    longest = max_model_len - max_tokens
    if longest < 2 * block_size + 1:
        raise BadInput(f"max_model_len {max_model_len} leaves too little room for prompts of 2 blocks + 1 "
                         f"with {max_tokens} new tokens")

    def prompt(n: int) -> list[int]:
        return [rng.choice(pool) for _ in range(n)]

    def requests(name: str, prompts: list[list[int]]) -> list[GenRequest]:
        return [GenRequest(f"{name}-{i}-len{len(p)}", p, max_tokens) for i, p in enumerate(prompts)]

    boundary = [prompt(n) for n in boundary_lengths(block_size, longest)]
    repeated, prefix = prompt(2 * block_size + 1), prompt(2 * block_size)
    return [
        Phase("boundary", requests("boundary", boundary)),
        Phase("boundary-streamed", requests("boundary-streamed", boundary), stream=True),
        Phase("repeated", requests("repeated", [repeated] * REPEATS)),
        Phase("repeated-concurrent", requests("repeated-concurrent", [repeated] * REPEATS), concurrent=True),
        Phase("shared-prefix", requests("shared-prefix", [prefix + prompt(rng.randrange(1, block_size)) for _ in range(4)])),
        Phase("burst", requests("burst", [prompt(rng.randrange(1, longest + 1)) for _ in range(BURST)]), concurrent=True),
        Phase("long", requests("long", [prompt(longest), prompt(longest - 1)])),
    ]

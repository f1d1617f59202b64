"""Workload phases both modes share: seeded prompts of a model's own token ids, by name.

Prompts are token ids, so their lengths are exact in the model's tokens whatever its tokenizer:
block-boundary lengths land on real block boundaries. The phases: block boundaries (whole
answers, then the same prompts streamed), the same prompt repeated (one after another, then all
at once), prompts sharing a prefix of whole blocks, a burst of mixed lengths at once, and
prompts as long as the model allows. Each phase draws from an RNG of its own (the seed and its
name), so picking some phases leaves their prompts as they are in the whole set.

A black-box run sends every phase (`phases`), each judged as one lane. `pdcheck run --workload`
picks phases by name (`local_workload`): their requests go through the gate one after another,
judged like the boundary workload, whose `boundary` is the gate's own (pdcheck.workload.boundary).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdcheck.errors import BadInput
from pdcheck.types import GenRequest
from pdcheck.workload.boundary import FIRST_ORDINARY_TOKEN, boundary_lengths, boundary_workload

REPEATS = 6
BURST = 8
SHARED = 4  # prompts sharing one prefix


@dataclass(frozen=True)
class Phase:
    name: str
    requests: list[GenRequest]
    concurrent: bool = False
    stream: bool = False


@dataclass(frozen=True)
class Prompts:
    """What every phase draws from: the token ids, the seed, the block size, and the model
    length that each prompt with its `max_tokens` new tokens fits in."""

    pool: Sequence[int]
    seed: int
    block_size: int
    max_model_len: int
    max_tokens: int

    def __post_init__(self):
        if self.longest < 2 * self.block_size + 1:
            raise BadInput(f"max_model_len {self.max_model_len} leaves too little room for prompts of 2 blocks + 1 "
                           f"with {self.max_tokens} new tokens")

    @property
    def longest(self) -> int:
        return self.max_model_len - self.max_tokens

    def rng(self, phase: str) -> random.Random:
        return random.Random(f"{self.seed}-{phase}")

    def prompt(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self.pool) for _ in range(n)]

    def requests(self, phase: str, prompts: list[list[int]]) -> list[GenRequest]:
        return [GenRequest(f"{phase}-{i}-len{len(p)}", p, self.max_tokens) for i, p in enumerate(prompts)]


def boundary_prompts(p: Prompts) -> list[list[int]]:
    rng = p.rng("boundary")
    return [p.prompt(rng, n) for n in boundary_lengths(p.block_size, p.longest)]


def boundary(p: Prompts) -> Phase:
    return Phase("boundary", p.requests("boundary", boundary_prompts(p)))


def boundary_streamed(p: Prompts) -> Phase:
    return Phase("boundary-streamed", p.requests("boundary-streamed", boundary_prompts(p)), stream=True)


def repeated(p: Prompts) -> Phase:
    prompt = p.prompt(p.rng("repeated"), 2 * p.block_size + 1)
    return Phase("repeated", p.requests("repeated", [prompt] * REPEATS))


def repeated_concurrent(p: Prompts) -> Phase:
    prompt = p.prompt(p.rng("repeated"), 2 * p.block_size + 1)
    return Phase("repeated-concurrent", p.requests("repeated-concurrent", [prompt] * REPEATS), concurrent=True)


def shared_prefix(p: Prompts) -> Phase:
    """Prompts of two whole blocks in common, each with a different partial last block."""
    rng = p.rng("shared-prefix")
    prefix = p.prompt(rng, 2 * p.block_size)
    prompts = [prefix + p.prompt(rng, rng.randrange(1, p.block_size)) for _ in range(SHARED)]
    return Phase("shared-prefix", p.requests("shared-prefix", prompts))


def burst(p: Prompts) -> Phase:
    rng = p.rng("burst")
    prompts = [p.prompt(rng, rng.randrange(1, p.longest + 1)) for _ in range(BURST)]
    return Phase("burst", p.requests("burst", prompts), concurrent=True)


def long(p: Prompts) -> Phase:
    rng = p.rng("long")
    return Phase("long", p.requests("long", [p.prompt(rng, p.longest), p.prompt(rng, p.longest - 1)]))


BUILDERS: dict[str, Callable[[Prompts], Phase]] = {
    "boundary": boundary, "boundary-streamed": boundary_streamed, "repeated": repeated,
    "repeated-concurrent": repeated_concurrent, "shared-prefix": shared_prefix, "burst": burst, "long": long,
}
# `pdcheck run --workload`: the gate sends one request after another and does not stream
LOCAL = ("boundary", "repeated", "shared-prefix", "burst", "long")


def phases(pool: Sequence[int], seed: int, block_size: int, max_model_len: int, max_tokens: int,
           names: Sequence[str] = tuple(BUILDERS)) -> list[Phase]:
    prompts = Prompts(pool, seed, block_size, max_model_len, max_tokens)
    return [BUILDERS[name](prompts) for name in names]


def local_workload(spec, names: Sequence[str], seed: int = 0, max_tokens: int = 16) -> list[GenRequest]:
    """The named phases' requests for an EngineSpec's model, in order; `boundary` is the gate's
    boundary workload, the others draw from the model's ordinary token ids."""
    vocab = json.loads((spec.model / "config.json").read_text())["vocab_size"]
    pool = range(FIRST_ORDINARY_TOKEN, vocab)
    requests = []
    for name in names:
        if name == "boundary":
            requests += boundary_workload(spec, seed, max_tokens)
        else:
            requests += phases(pool, seed, spec.block_size, spec.max_model_len, max_tokens, [name])[0].requests
    return requests


def workload_names(text: str) -> tuple[str, ...]:
    """`--workload a,b`: the phases to run, each once, in the order given."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in LOCAL]
    if not names or unknown:
        raise BadInput(f"expected phases among {', '.join(LOCAL)}, got {text!r}")
    if len(set(names)) != len(names):
        raise BadInput(f"a phase named twice in {text!r}")
    return names

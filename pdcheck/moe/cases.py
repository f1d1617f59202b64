"""MoE shape cases: the inputs a case stands for, the comparison with the reference, the replay line.

A case names every shape parameter and a seed; `inputs(case)` rebuilds the same tensors from
them, so a failing case replays exactly with the line its report ends with:

    python -c 'from pdcheck.moe.cases import MoECase, replay; replay("pdcheck.moe.chunked:ChunkedMoE", MoECase(...))'

An implementation is named by `module:Class`; the class is built with the case's chunk size and
called as impl(x, w13, w2, topk_weights, topk_ids). Routing is computed once by the reference
(float64 softmax, top-k) and handed to the implementation as float32 weights and int32 ids, so a
comparison judges the expert computation alone.

Tolerance, per output element: |out - ref| <= TOLERANCE[dtype] * (scale + |ref|). `scale` is
what rounding errors grow with: each sum's root-sum-square of its terms (it does not shrink when
the sum cancels, so tiny or cancelling shapes keep a fair bound), carried through
silu(gate) * up to first order and through the top-k weighted sum. bfloat16: 2**-5, 8 unit
roundoffs: the chain rounds gate/up, the activation, the down projection and the output to
bfloat16. float32: 2**-18, 64 unit roundoffs: there the accumulation over up to ~160 terms
dominates. Seen on 400 random shapes (hidden 1 to 160, intermediate 1 to 72): pdcheck's
ChunkedMoE at up to 2.5 (bfloat16) and 12.7 (float32) unit roundoffs of the scale, vLLM's CPU
op at up to 1.05 and 13.1: a margin of 3 to 5. The remainder sliced by tokens instead of tokens
x top_k was off by 25 or more (bfloat16) in 62 of 63 cases that trigger it (4.1 where the stale
row had a tiny top-k weight) and by over 1e6 (float32).
"""

from __future__ import annotations

import importlib
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from pdcheck.moe.reference import expert_forward, route

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 2.0**-18, "bfloat16": 2.0**-5}


@dataclass(frozen=True)
class MoECase:
    num_tokens: int
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    num_routed: int  # experts the router may pick; the other experts get no tokens
    chunk_size: int
    dtype: str
    renormalize: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("num_tokens", "hidden", "intermediate", "num_experts", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoECase.{name} {getattr(self, name)!r}: expected >= 1")
        if not 1 <= self.top_k <= self.num_routed <= self.num_experts:
            raise ValueError(f"MoECase top_k {self.top_k}, num_routed {self.num_routed}, num_experts "
                             f"{self.num_experts}: expected 1 <= top_k <= num_routed <= num_experts")
        if self.dtype not in DTYPES:
            raise ValueError(f"MoECase.dtype {self.dtype!r}: expected one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class MoEInputs:
    x: torch.Tensor  # [tokens, hidden], case dtype
    w13: torch.Tensor  # [experts, 2 * intermediate, hidden], case dtype
    w2: torch.Tensor  # [experts, hidden, intermediate], case dtype
    router_logits: torch.Tensor  # [tokens, experts], float32; -inf for experts never routed to


def inputs(case: MoECase) -> MoEInputs:
    """Unit-scale activations; weights scaled by 1/sqrt(fan-in) so every stage stays near 1."""
    generator = torch.Generator().manual_seed(case.seed)
    dtype, experts = DTYPES[case.dtype], case.num_experts

    def normal(*shape, fan_in=1):
        return torch.randn(*shape, generator=generator) / fan_in**0.5

    x = normal(case.num_tokens, case.hidden).to(dtype)
    w13 = normal(experts, 2 * case.intermediate, case.hidden, fan_in=case.hidden).to(dtype)
    w2 = normal(experts, case.hidden, case.intermediate, fan_in=case.intermediate).to(dtype)
    logits = normal(case.num_tokens, experts)
    logits[:, torch.randperm(experts, generator=generator)[case.num_routed:]] = float("-inf")
    return MoEInputs(x, w13, w2, logits)


def load(target: str):
    """The implementation class named `module:Class`."""
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"implementation {target!r}: expected module:Class")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Mismatch:
    target: str
    case: MoECase
    error: float
    tolerance: float
    where: tuple[int, int]

    def report(self) -> str:
        token, column = self.where
        return (f"{self.target} differs from the float64 reference: error {self.error:.3g} > tolerance "
                f"{self.tolerance:.3g} at token {token}, column {column} (the worst ratio) for {self.case}\n"
                f"replay: {replay_line(self.target, self.case)}")


def error_scale(data: MoEInputs, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] float64: the root-sum-square size of the terms behind each output."""
    x, w13, w2 = data.x.double(), data.w13.double(), data.w2.double()
    squares = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        tokens, slots = (ids == expert).nonzero(as_tuple=True)
        gate, up = (x[tokens] @ w13[expert].T).chunk(2, dim=-1)
        gate_rss, up_rss = (x[tokens] ** 2 @ (w13[expert] ** 2).T).sqrt().chunk(2, dim=-1)
        sigmoid = torch.sigmoid(gate)
        silu_slope = sigmoid * (1 + gate * (1 - sigmoid))
        act_scale = (silu_slope * gate_rss * up).abs() + (F.silu(gate) * up_rss).abs()
        down_scale = (act_scale**2 @ (w2[expert] ** 2).T).sqrt()
        squares.index_add_(0, tokens, (weights[tokens, slots, None].double() * down_scale) ** 2)
    return squares.sqrt()


def compare(target: str, case: MoECase, device: str = "cpu") -> Mismatch | None:
    """None if `target` matches the reference within the tolerance on `case`, else the mismatch.
    The implementation runs on `device`; the reference always on the CPU in float64."""
    data = inputs(case)
    weights, ids = route(data.router_logits, case.top_k, case.renormalize)
    weights = weights.float()
    ref = expert_forward(data.x, data.w13, data.w2, weights, ids)
    args = [t.to(device) for t in (data.x, data.w13, data.w2, weights, ids.int())]
    out = load(target)(case.chunk_size)(*args).cpu()
    tolerance = TOLERANCE[case.dtype] * (error_scale(data, weights, ids) + ref.abs())
    error = (out.double() - ref).abs()
    fails = ~(error <= tolerance)  # NaN fails too
    if not fails.any():
        return None
    ratio = (error / tolerance.clamp_min(1e-300)).nan_to_num(float("inf"))
    token, column = divmod(int(torch.where(fails, ratio, -1.0).argmax()), case.hidden)
    return Mismatch(target, case, error[token, column].item(), tolerance[token, column].item(), (token, column))


def replay_line(target: str, case: MoECase) -> str:
    """A shell line; strings are written in double quotes so the whole fits in single ones."""
    def literal(value) -> str:
        return f'"{value}"' if isinstance(value, str) else repr(value)

    fields = ", ".join(f"{name}={literal(value)}" for name, value in zip(case.__dataclass_fields__, astuple(case)))
    return f"python -c 'from pdcheck.moe.cases import MoECase, replay; replay({literal(target)}, MoECase({fields}))'"


def assert_matches_reference(target: str, case: MoECase) -> None:
    """Raises AssertionError with the mismatch's report (replay line included)."""
    mismatch = compare(target, case)
    if mismatch is not None:
        raise AssertionError(mismatch.report())


def replay(target: str, case: MoECase) -> None:
    """Raises AssertionError if the case still fails; says so loudly if it now passes."""
    assert_matches_reference(target, case)
    print(f"PASSES NOW: {target} matches the reference on {case}")

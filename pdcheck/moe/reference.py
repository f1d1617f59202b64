"""The float64 reference MoE forward that every implementation is compared with.

Weights follow vLLM's layout: `w13` [experts, 2 * intermediate, hidden] holds each expert's gate
rows then its up rows; `w2` [experts, hidden, intermediate]. Routing is a softmax over the
router logits and the top-k experts per token, renormalized to sum to 1 when asked. The
activation is SiLU-and-mul: silu(gate) * up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, top_k] float64, expert ids [tokens, top_k] int64)."""
    probs = torch.softmax(router_logits.double(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_forward(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The weighted sum of each token's top-k expert MLPs, in float64, for given routing."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        gate, up = (x[tokens] @ w13[expert].T).chunk(2, dim=-1)
        down = (F.silu(gate) * up) @ w2[expert].T
        out.index_add_(0, tokens, down * topk_weights[tokens, slots, None].double())
    return out


def reference_moe(x, router_logits, w13, w2, top_k: int, renormalize: bool) -> torch.Tensor:
    """The MoE layer's output [tokens, hidden] in float64."""
    weights, ids = route(router_logits, top_k, renormalize)
    return expert_forward(x, w13, w2, weights, ids)

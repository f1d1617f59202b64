"""A chunked MoE forward in the input dtype, shaped like vLLM's fused MoE while it still chunked.

The tokens x top_k (token, expert) assignment rows are processed a chunk of whole tokens at a
time: `chunk_size // top_k` tokens (at least one), so at most `chunk_size` rows per chunk. Work
buffers are allocated once for a full chunk and reused by every chunk; the last, partial chunk
(the remainder) gets views of their leading rows. As in the fused kernels, each step writes the
output view it is handed and reads its input from the start of the previous step's buffer by
the chunk's row count (tokens x top_k), not by that view's length: a view sliced too short goes
unnoticed, and the rows past its end still hold the previous chunk's values.

Matmuls and buffers are in the input dtype; the top-k weighted sum accumulates in float32 and
is rounded once, as vLLM's CPU kernel does. Weights use vLLM's layout (see reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Scratch:
    gate_up: torch.Tensor  # [rows, 2 * intermediate]
    act: torch.Tensor  # [rows, intermediate]
    down: torch.Tensor  # [rows, hidden]

    @classmethod
    def zeros(cls, rows: int, hidden: int, intermediate: int, like: torch.Tensor) -> Scratch:
        """Buffers with `like`'s dtype and device."""
        return cls(like.new_zeros(rows, 2 * intermediate), like.new_zeros(rows, intermediate),
                   like.new_zeros(rows, hidden))


def leading_rows(buffer: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The first `num_rows` rows from `buffer`'s start, read as a kernel given an address and a
    row count reads them: past the end of a shorter view, into the storage behind it."""
    return buffer.as_strided((num_rows, buffer.shape[1]), buffer.stride(), buffer.storage_offset())


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = weights[expert_ids[r]] @ rows[r], one matmul per expert that has rows."""
    for expert in expert_ids.unique().tolist():
        selected = (expert_ids == expert).nonzero().squeeze(1)
        out[selected] = rows[selected] @ weights[expert].T


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """Fills every row of `out` with silu(gate) * up from the same row of `gate_up`."""
    gate, up = leading_rows(gate_up, out.shape[0]).chunk(2, dim=-1)
    out.copy_(F.silu(gate) * up)


class ChunkedMoE:
    """Called as moe(x [T, H], w13, w2, topk_weights [T, k], topk_ids [T, k]) -> [T, H]."""

    def __init__(self, chunk_size: int):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size {chunk_size!r}: expected a positive int")
        self.chunk_size = chunk_size

    def __call__(self, x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        chunk_tokens = max(1, self.chunk_size // top_k)
        scratch = Scratch.zeros(chunk_tokens * top_k, w2.shape[1], w2.shape[2], x)
        out = torch.empty_like(x)
        for begin in range(0, num_tokens, chunk_tokens):
            end = min(begin + chunk_tokens, num_tokens)
            views = scratch
            if end - begin < chunk_tokens and begin > 0:  # the remainder chunk
                views = self.remainder_views(scratch, end - begin, top_k)
            out[begin:end] = self.run_chunk(x[begin:end], w13, w2, topk_weights[begin:end], topk_ids[begin:end], views)
        return out

    def remainder_views(self, scratch: Scratch, num_tokens: int, top_k: int) -> Scratch:
        rows = num_tokens * top_k
        return Scratch(scratch.gate_up[:rows], scratch.act[:rows], scratch.down[:rows])

    def run_chunk(self, x, w13, w2, topk_weights, topk_ids, views: Scratch) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        rows, expert_ids = topk_ids.numel(), topk_ids.reshape(-1).long()
        gate_up = leading_rows(views.gate_up, rows)
        grouped_matmul(x.repeat_interleave(top_k, dim=0), w13, expert_ids, out=gate_up)
        silu_and_mul(views.gate_up, out=views.act)
        down = leading_rows(views.down, rows)
        grouped_matmul(leading_rows(views.act, rows), w2, expert_ids, out=down)
        weighted = down.view(num_tokens, top_k, -1).float() * topk_weights.float()[..., None]
        return weighted.sum(dim=1).to(x.dtype)

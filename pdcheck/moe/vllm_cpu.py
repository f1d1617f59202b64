"""vLLM's CPU fused-MoE op called directly on tensors, the way CPUUnquantizedExperts calls it.

CPUUnquantizedExperts (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) zero-pads the
intermediate size to a multiple of 32 (`_pad_moe_intermediate`), prepacks w13 and w2 with
`cpu_prepack_moe_weight` once after loading (`process_weights_after_loading`), and each forward
calls `cpu_fused_moe` with float32 top-k weights and int32 ids (`apply`). This does the same
with no engine. The op needs a hidden size that is a multiple of 32 and raises RuntimeError
otherwise. Importing this module imports vLLM (a few seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

ALIGNMENT = 32


def cpu_isa(dtype: torch.dtype) -> str:
    """The kernel vLLM picks: AMX for bfloat16 where the CPU has AMX tiles
    (X86CPUUnquantizedExperts), else the portable vector kernel (CPUUnquantizedExperts)."""
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


def pad_intermediate(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows after each of the gate and up halves of w13, zero columns after w2's."""
    intermediate = w2.shape[2]
    pad = -intermediate % ALIGNMENT
    if pad == 0:
        return w13, w2
    gate, up = w13.chunk(2, dim=1)
    w13 = torch.cat([F.pad(gate, (0, 0, 0, pad)), F.pad(up, (0, 0, 0, pad))], dim=1)
    return w13, F.pad(w2, (0, pad))


class VllmCpuMoE:
    """Same call as pdcheck.moe.chunked.ChunkedMoE. `chunk_size` is accepted and unused: the op
    takes every token at once (docs/moe.md says how it splits the work)."""

    def __init__(self, chunk_size: int = 0):
        self.chunk_size = chunk_size

    def __call__(self, x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
        isa = cpu_isa(x.dtype)
        w13, w2 = pad_intermediate(w13, w2)
        packed_w13 = cpu_prepack_moe_weight(w13.contiguous(), isa)
        packed_w2 = cpu_prepack_moe_weight(w2.contiguous(), isa)
        out = torch.empty_like(x)
        cpu_fused_moe(out, x.contiguous(), packed_w13, packed_w2, None, None,
                      topk_weights.to(torch.float32).contiguous(), topk_ids.to(torch.int32).contiguous(), "silu", isa)
        return out

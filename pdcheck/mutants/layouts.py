"""Layout mutants: KV layouts guessed or reshaped instead of named (vLLM #23536)."""

from __future__ import annotations

import torch

from pdcheck.connector.layouts import KVLayout, extract


def guessed_extract(cache: torch.Tensor, block_ids) -> torch.Tensor:
    """Guesses FlashInfer when dim 1 is 2: a FlashAttention cache with exactly 2 blocks also
    has a 2 there, and is then read with the wrong block dimension."""
    layout = KVLayout.FLASH_INFER if cache.dim() == 5 and cache.shape[1] == 2 else KVLayout.FLASH_ATTN
    return extract(cache, layout, block_ids)


def slot_reshape_extract(cache: torch.Tensor, block_ids) -> torch.Tensor:
    """Reads a FlashInfer cache [blocks, 2, block, heads, dim] through a FlashAttention-style
    slot view ([2, blocks * block, heads, dim] after a plain reshape)."""
    kv, blocks, block = 2, cache.shape[0], cache.shape[2]
    slots = cache.reshape(kv, blocks * block, *cache.shape[3:])
    out = [slots[:, b * block : (b + 1) * block] for b in block_ids]
    return torch.stack(out) if out else cache.new_empty((0, kv, block, *cache.shape[3:]))

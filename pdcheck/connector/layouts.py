"""Paged KV cache layouts, named, never guessed from a tensor's shape.

A layer's cache holds `num_blocks` blocks of `block_size` token slots. Where the block
dimension sits depends on the attention backend:

| layout       | per-layer shape                              | block dim |
| ------------ | -------------------------------------------- | --------- |
| FLASH_ATTN   | [2, blocks, block_size, kv_heads, head_dim]  | 1         |
| FLASH_INFER  | [blocks, 2, block_size, kv_heads, head_dim]  | 0         |
| MLA          | [blocks, block_size, latent_dim]             | 0         |
| BLOCKS_FIRST | [blocks, kv_heads, block_size, C]            | 0         |

BLOCKS_FIRST is the standardized view vLLM (0.32 and later) hands connectors on every backend,
CPU included (K and V side by side in C). A FlashAttention cache with exactly two blocks has
the same shape pattern as a FlashInfer one, which is why the layout must be told, not inferred.

`extract` gathers whole blocks into a new tensor [n, *block]; `inject` writes them back.
"""

from __future__ import annotations

import enum

import torch


class KVLayout(enum.Enum):
    FLASH_ATTN = "flash_attn"
    FLASH_INFER = "flash_infer"
    MLA = "mla"
    BLOCKS_FIRST = "blocks_first"

    @property
    def block_dim(self) -> int:
        return 1 if self is KVLayout.FLASH_ATTN else 0

    @property
    def ndim(self) -> int:
        return {KVLayout.FLASH_ATTN: 5, KVLayout.FLASH_INFER: 5, KVLayout.MLA: 3, KVLayout.BLOCKS_FIRST: 4}[self]


def num_blocks(cache: torch.Tensor, layout: KVLayout) -> int:
    check_shape(cache, layout)
    return cache.shape[layout.block_dim]


def check_shape(cache: torch.Tensor, layout: KVLayout) -> None:
    if cache.dim() != layout.ndim:
        raise ValueError(f"{layout.name} cache must have {layout.ndim} dims, got shape {tuple(cache.shape)}")
    if layout in (KVLayout.FLASH_ATTN, KVLayout.FLASH_INFER) and cache.shape[1 - layout.block_dim] != 2:
        raise ValueError(f"{layout.name} cache needs a K/V dim of 2 at {1 - layout.block_dim}: {tuple(cache.shape)}")


def block_index(block_ids, device) -> torch.Tensor:
    """The ids as a long tensor on `device`. To a GPU it goes as a pinned copy queued on the current
    stream, so the host does not wait for that stream (an engine's, still busy with its step)."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long)
    if torch.device(device).type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


def extract(cache: torch.Tensor, layout: KVLayout, block_ids) -> torch.Tensor:
    """A copy of the given blocks, block dim first: [len(block_ids), *one_block]."""
    check_shape(cache, layout)
    index = block_index(block_ids, cache.device)
    return cache.index_select(layout.block_dim, index).movedim(layout.block_dim, 0).contiguous()


def inject(cache: torch.Tensor, layout: KVLayout, block_ids, blocks: torch.Tensor) -> None:
    """Write blocks (as `extract` returns them) into the given block ids, in place."""
    check_shape(cache, layout)
    ids = list(block_ids)
    if blocks.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} block ids but {blocks.shape[0]} blocks of data")
    cache.index_copy_(layout.block_dim, block_index(ids, cache.device), blocks.movedim(0, layout.block_dim).to(cache.dtype))

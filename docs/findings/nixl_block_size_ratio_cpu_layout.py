#!/usr/bin/env python3
"""The mechanism of nixl-block-size-ratio-cpu, without engines: vLLM's block-size conversion
for received KV does not give the block CPU attention itself writes.

Writes the same 64 tokens of K and V (2 KV heads, head_dim 32, float32) with CPU attention's own
cache op (`cpu_attn_reshape_and_cache`, as `CPUAttentionBackendImpl.do_kv_cache_update` calls it)
into two 32-token blocks (prefill) and into one 64-token block (decode). NIXL copies each
32-token block's bytes into one half of the 64-token block; `kv_postprocess_blksize_on_receive`
then regroups them. Exits 1 with REPRODUCED when the result differs from decode's own block.

    python nixl_block_size_ratio_cpu_layout.py
"""

import sys

import torch
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.utils import kv_postprocess_blksize_on_receive
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

HEADS, HEAD_DIM, TOKENS, SMALL, LARGE = 2, 32, 64, 32, 64
RATIO = LARGE // SMALL


def write(key, value, block_size):
    """The per-layer cache CPU attention keeps: [blocks, heads, block_size, 2 * head_dim]."""
    num_blocks = TOKENS // block_size
    cache = torch.zeros(num_blocks, HEADS, block_size, 2 * HEAD_DIM)
    key_cache, value_cache = cache.view(num_blocks, HEADS, 2 * block_size, HEAD_DIM).chunk(2, dim=2)
    isa = _get_attn_isa(torch.float32, block_size, HEAD_DIM)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(TOKENS), isa)
    return cache, isa


def main():
    torch.manual_seed(0)
    key, value = torch.randn(TOKENS, HEADS, HEAD_DIM), torch.randn(TOKENS, HEADS, HEAD_DIM)
    small, isa = write(key, value, SMALL)
    large, _ = write(key, value, LARGE)
    print(f"CPU attention ISA: {isa}")

    # How one head of one block is laid out: K transposed [head_dim, block_size], then V [block_size, head_dim].
    head = large[0, 0].reshape(-1)
    k_transposed = torch.equal(head[:HEAD_DIM * LARGE].view(HEAD_DIM, LARGE), key[:, 0].T)
    v_rows = torch.equal(head[HEAD_DIM * LARGE:].view(LARGE, HEAD_DIM), value[:, 0])
    print(f"a head's block is K transposed then V: {k_transposed and v_rows}")

    received = torch.zeros_like(large)  # NIXL: remote block i -> bytes [i/RATIO, i%RATIO] of the local block
    received.view(-1).copy_(small.reshape(-1))
    kv_postprocess_blksize_on_receive(received, torch.tensor([0]), RATIO)
    halves = received[0].reshape(HEADS, -1)
    mine = large[0].reshape(HEADS, -1)
    k_len = HEAD_DIM * LARGE
    k_right = torch.equal(halves[:, :k_len], mine[:, :k_len])
    v_halves, v_mine = halves[:, k_len:].view(HEADS, RATIO, -1), mine[:, k_len:].view(HEADS, RATIO, -1)
    v_right = [torch.equal(v_halves[:, i], v_mine[:, i]) for i in range(RATIO)]
    print(f"after kv_postprocess_blksize_on_receive: K right {k_right}, V of tokens 0-31 right {v_right[0]}, "
          f"V of tokens 32-63 right {v_right[1]}")

    # What the conversion would have to do for this layout: per head, join the sub-blocks' K along tokens
    # (the inner axis of K transposed) and their V rows.
    sub = small.reshape(RATIO, HEADS, -1)
    k_sub = sub[:, :, :HEAD_DIM * SMALL].reshape(RATIO, HEADS, HEAD_DIM, SMALL)
    v_sub = sub[:, :, HEAD_DIM * SMALL:].reshape(RATIO, HEADS, SMALL, HEAD_DIM)
    joined = torch.cat([k_sub.permute(1, 2, 0, 3).reshape(HEADS, -1), v_sub.permute(1, 0, 2, 3).reshape(HEADS, -1)], 1)
    print(f"joined per head as K transposed then V: equal to decode's own block {torch.equal(joined, mine)}")

    if torch.equal(halves, mine):
        print("did not reproduce: the converted block equals decode's own")
        return 0
    print("REPRODUCED: the converted block differs from the one decode's CPU attention writes for the same tokens")
    return 1


if __name__ == "__main__":
    sys.exit(main())

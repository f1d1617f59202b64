"""KV layouts: extract then inject restores exactly the chosen blocks and nothing else."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pdcheck.connector.layouts import KVLayout, extract, inject, num_blocks  # noqa: E402


def make_cache(layout: KVLayout, blocks: int, block_size: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    shape = {
        KVLayout.FLASH_ATTN: (2, blocks, block_size, heads, dim),
        KVLayout.FLASH_INFER: (blocks, 2, block_size, heads, dim),
        KVLayout.MLA: (blocks, block_size, dim),
        KVLayout.BLOCKS_FIRST: (blocks, heads, block_size, dim),
    }[layout]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def caches(draw):
    layout = draw(st.sampled_from(list(KVLayout)))
    blocks = draw(st.integers(1, 9))
    cache = make_cache(layout, blocks, draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 6)),
                       draw(st.integers(0, 2**16)))
    ids = draw(st.lists(st.integers(0, blocks - 1), unique=True, max_size=blocks))
    return layout, cache, draw(st.permutations(ids))


@settings(max_examples=300, deadline=None)
@given(caches())
def test_extract_then_inject_into_a_blank_cache_restores_exactly_those_blocks(case):
    layout, cache, ids = case
    data = extract(cache, layout, ids)
    target = torch.zeros_like(cache)
    inject(target, layout, ids, data)
    for b in range(num_blocks(cache, layout)):
        got, want = target.select(layout.block_dim, b), cache.select(layout.block_dim, b)
        assert torch.equal(got, want if b in ids else torch.zeros_like(want)), f"{layout} block {b}"


@settings(max_examples=100, deadline=None)
@given(caches())
def test_blocks_move_between_caches_of_the_same_layout_by_id(case):
    layout, src, ids = case
    dst = make_cache(layout, num_blocks(src, layout) + 2, *shape_args(src, layout), seed=7)
    dst_ids = [i + 2 for i in ids]
    inject(dst, layout, dst_ids, extract(src, layout, ids))
    assert torch.equal(extract(dst, layout, dst_ids), extract(src, layout, ids))


def shape_args(cache, layout):
    """(block_size, heads, dim) of a cache made by make_cache."""
    s = cache.shape
    if layout is KVLayout.MLA:
        return s[1], 1, s[2]
    if layout is KVLayout.BLOCKS_FIRST:
        return s[2], s[1], s[3]
    return s[2], s[3], s[4]


def test_flash_attention_cache_with_two_blocks_is_not_read_as_flash_infer():
    """The shape of a 2-block FlashAttention cache also fits FlashInfer's pattern."""
    cache = make_cache(KVLayout.FLASH_ATTN, 2, 4, 2, 3, seed=1)
    assert cache.shape[1] == 2  # what a shape test would take for FlashInfer's K/V dim
    block1 = extract(cache, KVLayout.FLASH_ATTN, [1])[0]
    assert torch.equal(block1, torch.stack([cache[0, 1], cache[1, 1]]))
    assert not torch.equal(block1, extract(cache, KVLayout.FLASH_INFER, [1])[0])


def test_wrong_rank_and_mismatched_data_are_refused():
    with pytest.raises(ValueError, match="must have 5 dims"):
        extract(torch.zeros(2, 3, 4), KVLayout.FLASH_ATTN, [0])
    with pytest.raises(ValueError, match="2 block ids but 1 blocks"):
        cache = make_cache(KVLayout.MLA, 3, 2, 1, 2, seed=0)
        inject(cache, KVLayout.MLA, [0, 1], extract(cache, KVLayout.MLA, [0]))

"""Block manager: exact block ids for allocation, prefix sharing, eviction and freeing."""

from __future__ import annotations

import pytest

from ftserve.engine.block_manager import BlockManager


def test_fresh_prompt_takes_blocks_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    alloc = bm.allocate(list(range(10)))
    assert alloc is not None
    assert alloc.block_table == [0, 1, 2]
    assert alloc.num_cached_tokens == 0
    assert bm.num_free_blocks == 5


def test_shared_prefix_reuses_committed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = bm.allocate(list(range(10)))
    assert first is not None
    bm.commit(first.block_table, list(range(10)), num_computed=10)
    second = bm.allocate([*range(8), 99, 98, 97])
    assert second is not None
    assert second.block_table[:2] == first.block_table[:2]
    assert second.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 2 and bm.blocks[2].ref_count == 1
    assert bm.prefix_hits == 2


def test_last_prompt_token_is_never_served_from_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    first = bm.allocate(prompt)
    assert first is not None
    bm.commit(first.block_table, prompt, num_computed=8)
    again = bm.allocate(prompt)
    assert again is not None
    assert again.num_cached_tokens == 4  # the second block holds the last token: recomputed in a fresh block
    assert again.block_table[0] == first.block_table[0]
    assert again.block_table[1] not in first.block_table


def test_adapter_namespace_separates_prefixes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    first = bm.allocate(prompt, namespace="a")
    assert first is not None
    bm.commit(first.block_table, prompt, num_computed=9, namespace="a")
    other = bm.allocate(prompt, namespace="b")
    assert other is not None and other.num_cached_tokens == 0


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    first = bm.allocate(prompt)
    assert first is not None
    table = list(first.block_table)
    bm.commit(first.block_table, prompt, num_computed=5)
    bm.free(first.block_table)
    assert first.block_table == [] and bm.num_free_blocks == 4
    hit = bm.allocate(prompt)
    assert hit is not None and hit.block_table[:2] == table[:2] and hit.num_cached_tokens == 4
    bm.free(hit.block_table)
    # Filling the whole cache with other content evicts the cached blocks.
    other = bm.allocate([7, 7, 7, 7, 7, 7, 7, 7])
    assert other is not None
    bm.free(other.block_table)
    miss = bm.allocate(prompt)
    assert miss is not None and miss.num_cached_tokens == 0


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate(list(range(13))) is None
    assert bm.num_free_blocks == 3 and bm.prefix_queries == 0


def test_ensure_capacity_grows_the_table_and_reports_exhaustion() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    alloc = bm.allocate([1, 2, 3])
    assert alloc is not None
    table = alloc.block_table
    assert bm.ensure_capacity(table, 4) and table == [0]
    assert bm.ensure_capacity(table, 5) and table == [0, 1]
    assert bm.ensure_capacity(table, 12) and table == [0, 1, 2]
    assert not bm.ensure_capacity(table, 13) and table == [0, 1, 2]


def test_all_blocks_free_after_every_sequence_is_freed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tables = []
    for i in range(4):
        prompt = [0, 1, 2, 3, 4, 5, 6, 7, 100 + i]
        alloc = bm.allocate(prompt)
        assert alloc is not None
        bm.commit(alloc.block_table, prompt, num_computed=len(prompt))
        tables.append(alloc.block_table)
    for table in tables:
        bm.free(table)
    assert bm.num_free_blocks == 16
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_double_free_is_an_error() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    alloc = bm.allocate([1, 2])
    assert alloc is not None
    table = list(alloc.block_table)
    bm.free(alloc.block_table)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(table)

"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, and automatic prefix caching.

A *full* block is identified by a hash chained over every token before it (and over the adapter, whose
weights change the KV): two sequences sharing a prefix share the blocks of that prefix. A block nobody
references stays cached (its KV is still valid) until its space is needed; free blocks are reused least
recently freed first, so hot prefixes survive longest. Plain Python, no tensors: testable on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its KV computed; None = not shareable


@dataclass(frozen=True)
class Allocation:
    block_table: list[int]  # block ids holding the prompt, in order
    num_cached_tokens: int  # leading prompt tokens whose KV is already in those blocks (a block multiple)


def chain_hash(parent: int | None, tokens: Sequence[int], namespace: str | None) -> int:
    """The identity of a full block: everything before it, its own tokens, and the adapter it was made with."""
    return hash((parent, tuple(tokens), namespace))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, oldest-freed first. Cached ones (hash set) can still be revived on a hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # prompt blocks found in the cache

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - len(self._free) / self.num_blocks

    # -- allocation ------------------------------------------------------------------------------------

    def allocate(self, prompt: Sequence[int], namespace: str | None = None) -> Allocation | None:
        """Blocks for a new prompt, reusing cached full blocks of its prefix; None (nothing changed) if full.

        The last prompt token is never served from the cache: its logits are needed to sample.
        """
        cached: list[int] = []
        usable = (len(prompt) - 1) // self.block_size if self.enable_prefix_caching else 0
        parent: int | None = None
        for i in range(usable):
            parent = chain_hash(parent, prompt[i * self.block_size : (i + 1) * self.block_size], namespace)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            cached.append(block_id)
        fresh_needed = self.blocks_needed(len(prompt)) - len(cached)
        revived_from_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if fresh_needed + revived_from_free > len(self._free):
            return None
        self.prefix_queries += usable
        self.prefix_hits += len(cached)
        for block_id in cached:  # take the hits out of the free list before fresh blocks are drawn from it
            self._ref(block_id)
        table = cached + [self._take_fresh() for _ in range(fresh_needed)]
        return Allocation(table, len(cached) * self.block_size)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens``; False (nothing changed) if out of blocks."""
        extra = self.blocks_needed(num_tokens) - len(block_table)
        if extra <= 0:
            return True
        if extra > len(self._free):
            return False
        block_table.extend(self._take_fresh() for _ in range(extra))
        return True

    def commit(
        self, block_table: list[int], token_ids: Sequence[int], num_computed: int, namespace: str | None = None
    ) -> None:
        """Publish the full blocks whose KV is computed (the first ``num_computed`` tokens) for reuse."""
        if not self.enable_prefix_caching:
            return
        parent: int | None = None
        for i in range(num_computed // self.block_size):
            block = self.blocks[block_table[i]]
            parent = chain_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size], namespace)
            if block.hash is None:
                if parent in self._cached:  # same content computed twice concurrently: keep the first
                    continue
                block.hash = parent
                self._cached[parent] = block.block_id

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Give back the blocks past what ``num_tokens`` need (those of rejected speculative tokens)."""
        keep = self.blocks_needed(num_tokens)
        if len(block_table) > keep:
            self.free(block_table[keep:])
            del block_table[keep:]

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks keep their cached KV until reused."""
        for block_id in reversed(block_table):  # tail blocks are the least shareable: reused first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_count == 0:
                self._free[block_id] = None
        block_table.clear()

    # -- internals -------------------------------------------------------------------------------------

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached KV it held
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

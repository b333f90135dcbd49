"""Continuous batching with chunked prefill over the paged KV cache.

Each step has a token budget. Running requests go first, so decoding never waits behind a long prompt:
each decoding request takes one token, a request still prefilling takes the next chunk of its prompt.
Waiting requests join with what budget is left, in arrival order, when their prompt's blocks fit (a
prefix-cache hit makes them need fewer). When a running request needs a block and none is free, the most
recently admitted one is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ftserve.engine.base import RequestState
from ftserve.engine.batch import ScheduledChunk, SchedulerOutput
from ftserve.engine.block_manager import BlockManager
from ftserve.engine.speculative import AcceptanceRate

_ids = itertools.count()


@dataclass(eq=False)
class Sequence(RequestState):
    """A request as the scheduler tracks it."""

    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # prompt + generated, the KV of which is computed in order
    num_computed: int = 0  # leading tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    namespace: str | None = None  # prefix-cache namespace: the adapter and its version
    draft: list[int] = field(default_factory=list)  # tokens proposed for this step (speculative decoding)
    acceptance: AcceptanceRate | None = None  # of its drafts so far (adaptive speculative decoding)

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache: 1 while decoding, more while its prompt is being prefilled."""
        return len(self.token_ids) - self.num_computed

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)


class Drafting(Protocol):
    """Speculative decoding as the scheduler sees it (``engine/speculator.py``)."""

    def begin_step(self, decoding: list[Sequence]) -> None:
        """A step starts with ``decoding`` sequences (what a drafted row costs, and pays, depends on all)."""
        ...

    def draft_len(self, seq: Sequence, limit: int) -> int:
        """Tokens to draft for a decoding sequence this step: 0 (none) to ``limit``."""
        ...

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        """Set ``seq.draft`` to at most ``k`` tokens for each (sequence, k), blocks already reserved."""
        ...


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int = 1 << 30,
        drafting: Drafting | None = None,
    ) -> None:
        self.blocks = blocks
        self.drafting = drafting
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        wants: list[tuple[Sequence, int]] = []  # decoding sequences that draft, and how many tokens at most
        if self.drafting is not None:
            self.drafting.begin_step([s for s in self.running if s.pending == 1])
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an earlier iteration of this loop
                continue
            pending = seq.pending
            n = min(pending, budget)
            seq.draft = []
            # A decoding sequence may carry drafted tokens, verified by the same forward: reserve their blocks
            # now (a draft model writes its own KV there while drafting), draft once the batch is known.
            k = self.drafting.draft_len(seq, budget - 1) if pending == 1 and self.drafting is not None else 0
            if not self._reserve(seq, seq.num_computed + n + k, out):
                continue
            out.chunks.append(self._chunk(seq, n))
            budget -= n + k
            if k:
                wants.append((seq, k))
        budget += self._draft([(seq, k) for seq, k in wants if seq in self.running], out)
        adapters = {s.request.adapter for s in self.running} - {None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            adapter = seq.request.adapter
            if adapter is not None and adapter not in adapters and len(adapters) >= self.max_loras:
                break  # every LoRA slot is taken by running requests: wait for one to free up
            alloc = self.blocks.allocate(seq.token_ids, seq.namespace)
            if alloc is None:
                break  # keep arrival order: wait for blocks rather than let later requests overtake
            self.waiting.popleft()
            seq.draft = []
            seq.block_table = alloc.block_table
            seq.num_computed = alloc.num_cached_tokens
            if seq.scheduled_at is None:  # first admission (not a re-admission after preemption)
                seq.scheduled_at = time.monotonic()
                seq.num_cached_tokens = alloc.num_cached_tokens
            n = min(seq.pending, budget)
            self.running.append(seq)
            if adapter is not None:
                adapters.add(adapter)
            out.chunks.append(self._chunk(seq, n))
            budget -= n
        return out

    def _draft(self, wants: list[tuple[Sequence, int]], out: SchedulerOutput) -> int:
        """Fill the drafts of ``wants`` (one batched call) into their chunks; return the budget left unused."""
        if self.drafting is None or not wants:
            return 0
        self.drafting.propose(wants)
        chunks = {c.seq_id: c for c in out.chunks}
        unused = 0
        for seq, k in wants:
            del seq.draft[k:]
            chunk = chunks[seq.seq_id]
            chunk.num_tokens += len(seq.draft)
            chunk.num_draft = len(seq.draft)
            unused += k - len(seq.draft)
            self.blocks.trim(seq.block_table, seq.num_computed + chunk.num_tokens)  # blocks of tokens not drafted
        return unused

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> ScheduledChunk:
        sample = seq.num_computed + n == len(seq.token_ids)
        return ScheduledChunk(seq.seq_id, seq.num_computed, n, sample)  # drafts are added by _draft

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Blocks for ``num_tokens`` of ``seq``, preempting the newest running sequences if needed."""
        while not self.blocks.ensure_capacity(seq.block_table, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        out.preempted.append(seq.seq_id)
        self.num_preemptions += 1
        out.chunks = [c for c in out.chunks if c.seq_id != seq.seq_id]

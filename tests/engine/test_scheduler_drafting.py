"""The scheduler's side of speculative decoding: blocks for the drafts are reserved before drafting, the
drafts land in their chunks, and what was reserved but not drafted goes back (blocks and token budget)."""

from __future__ import annotations

from typing import Any

from ftserve.engine.block_manager import BlockManager
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.engine.scheduler import Scheduler, Sequence


class FakeDrafting:
    """Asks for ``k`` tokens per decoding sequence and proposes ``proposals[seq_id]`` (possibly fewer)."""

    def __init__(self, k: int, proposals: dict[int, list[int]]) -> None:
        self.k = k
        self.proposals = proposals
        self.blocks_seen: dict[int, int] = {}

    def begin_step(self, decoding: list[Sequence]) -> None:
        self.decoding = [seq.seq_id for seq in decoding]

    def draft_len(self, seq: Sequence, limit: int) -> int:
        return min(self.k, limit)

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        for seq, k in wants:
            self.blocks_seen[seq.seq_id] = len(seq.block_table)  # reserved before drafting
            seq.draft = self.proposals.get(seq.seq_id, [])[:k]


def sequence(prompt_len: int, **kwargs: Any) -> Sequence:
    request = GenerationRequest("r", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=64), **kwargs)
    return Sequence(request, detok=None, generator=None)  # type: ignore[arg-type]  (the scheduler needs neither)


def decoding(scheduler: Scheduler, *seqs: Sequence) -> None:
    """Admit and prefill ``seqs``, then give each a first generated token: they are decoding."""
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    for chunk in out.chunks:
        seq = next(s for s in seqs if s.seq_id == chunk.seq_id)
        seq.num_computed += chunk.num_tokens
        seq.token_ids.append(99)


def test_drafts_fill_their_chunks_and_unused_reservations_go_back() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    a, b = sequence(7), sequence(7)  # 8 tokens after the first generated one: 2 full blocks
    drafting = FakeDrafting(k=6, proposals={})
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, drafting=drafting)
    decoding(scheduler, a, b)
    drafting.proposals = {a.seq_id: [5, 6, 7, 8, 9, 10], b.seq_id: [5]}
    out = scheduler.schedule()
    chunks = {c.seq_id: c for c in out.chunks}
    assert (chunks[a.seq_id].num_tokens, chunks[a.seq_id].num_draft) == (7, 6)
    assert (chunks[b.seq_id].num_tokens, chunks[b.seq_id].num_draft) == (2, 1)
    assert drafting.decoding == [a.seq_id, b.seq_id]  # the drafts were chosen knowing the whole batch
    # Both had blocks for 8 + 1 + 6 tokens while drafting; b keeps only what 8 + 1 + 1 need.
    assert drafting.blocks_seen == {a.seq_id: 4, b.seq_id: 4}
    assert (len(a.block_table), len(b.block_table)) == (4, 3)
    assert blocks.num_free_blocks == 16 - 7


def test_budget_left_by_short_drafts_admits_waiting_requests() -> None:
    blocks = BlockManager(num_blocks=32, block_size=4)
    running = sequence(3)
    drafting = FakeDrafting(k=8, proposals={})  # asks for 8, proposes nothing
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=10, drafting=drafting)
    decoding(scheduler, running)
    waiting = sequence(5)
    scheduler.add(waiting)
    out = scheduler.schedule()
    chunks = {c.seq_id: c for c in out.chunks}
    assert chunks[running.seq_id].num_tokens == 1 and chunks[running.seq_id].num_draft == 0
    assert chunks[waiting.seq_id].num_tokens == 5  # admitted with the budget the empty draft gave back
    assert drafting.decoding == [running.seq_id]

"""Turns a :class:`SchedulerOutput` into the packed tensors of one forward (:class:`ForwardBatch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftserve.engine.batch import ForwardBatch, SchedulerOutput
from ftserve.engine.scheduler import Sequence


@dataclass(frozen=True)
class Piece:
    """Consecutive tokens of one sequence for a forward."""

    token_ids: list[int]  # the tokens to compute
    start: int  # position of the first one (= tokens of this sequence already in the KV cache)
    block_table: list[int]  # the sequence's blocks, covering start + len(token_ids) positions
    logit_rows: int  # how many of the last tokens give logits (0: none)


def pack(pieces: list[Piece], block_size: int, device: torch.device) -> ForwardBatch:
    """One packed batch: pieces one after another, logits rows in piece order."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    for piece in pieces:
        span = range(piece.start, piece.start + len(piece.token_ids))
        input_ids.extend(piece.token_ids)
        positions.extend(span)
        table = piece.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
        logits_indices.extend(range(len(input_ids) - piece.logit_rows, len(input_ids)))
    width = max(len(p.block_table) for p in pieces)
    padded = [p.block_table + [0] * (width - len(p.block_table)) for p in pieces]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return ForwardBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        query_lens=[len(p.token_ids) for p in pieces],
        context_lens=[p.start + len(p.token_ids) for p in pieces],
        block_tables=tensor(padded),
        logits_indices=tensor(logits_indices),
    )


def build_batch(
    out: SchedulerOutput, seqs: dict[int, Sequence], block_size: int, device: torch.device
) -> tuple[ForwardBatch, list[Sequence]]:
    """The batch for ``out`` and the sequences that sample this step, in logits-row order (a sequence with a
    draft of ``k`` tokens owns ``k + 1`` consecutive rows: its last known token's and every drafted one's)."""
    pieces: list[Piece] = []
    sampling: list[Sequence] = []
    for chunk in out.chunks:
        seq = seqs[chunk.seq_id]
        known = chunk.num_tokens - chunk.num_draft
        ids = seq.token_ids[chunk.start : chunk.start + known] + seq.draft[: chunk.num_draft]
        pieces.append(Piece(ids, chunk.start, seq.block_table, 1 + chunk.num_draft if chunk.sample else 0))
        if chunk.sample:
            sampling.append(seq)
    return pack(pieces, block_size, device), sampling

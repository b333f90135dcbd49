"""Turns a :class:`SchedulerOutput` into the packed tensors of one forward (:class:`ForwardBatch`)."""

from __future__ import annotations

import torch

from ftserve.engine.batch import ForwardBatch, SchedulerOutput
from ftserve.engine.scheduler import Sequence


def build_batch(
    out: SchedulerOutput, seqs: dict[int, Sequence], block_size: int, device: torch.device
) -> tuple[ForwardBatch, list[Sequence]]:
    """The batch for ``out`` and the sequences that sample this step, in logits-row order (a sequence with a
    draft of ``k`` tokens owns ``k + 1`` consecutive rows)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    sampling: list[Sequence] = []
    tables: list[list[int]] = []
    for chunk in out.chunks:
        seq = seqs[chunk.seq_id]
        span = range(chunk.start, chunk.start + chunk.num_tokens)
        known = chunk.num_tokens - chunk.num_draft
        input_ids.extend(seq.token_ids[chunk.start : chunk.start + known] + seq.draft[: chunk.num_draft])
        positions.extend(span)
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
        tables.append(table)
        if chunk.sample:  # the last token's logits; with a draft, those of every drafted position too
            logits_indices.extend(range(len(input_ids) - 1 - chunk.num_draft, len(input_ids)))
            sampling.append(seq)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    batch = ForwardBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        query_lens=[c.num_tokens for c in out.chunks],
        context_lens=[c.start + c.num_tokens for c in out.chunks],
        block_tables=tensor(padded),
        logits_indices=tensor(logits_indices),
    )
    return batch, sampling

"""The typed hand-off from the scheduler to the runner, and from the runner to the model.

Leaf module: no engine logic, only what one step computes and the tensors describing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ScheduledChunk:
    """A run of consecutive tokens of one sequence to compute this step."""

    seq_id: int  # Sequence.seq_id
    start: int  # position of the first token of the chunk (= tokens already in the KV cache)
    num_tokens: int  # tokens computed this step: the whole rest of a prompt, a prefill chunk, or 1 (decode)
    sample: bool  # the chunk reaches the end of the known tokens: sample the next token from its last logits
    num_draft: int = 0  # speculative tokens at the end of the chunk (Sequence.draft); all its rows give logits


@dataclass
class SchedulerOutput:
    """What one engine step runs; the runner turns it into a :class:`ForwardBatch`."""

    chunks: list[ScheduledChunk] = field(default_factory=list)  # in packing order
    preempted: list[int] = field(default_factory=list)  # seq ids sent back to waiting (KV freed)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class LoraBatch:
    """What the batched LoRA delta needs: the adapters present and, per packed token, which one it uses."""

    active_slots: list[int]  # distinct non-zero slots present in the batch
    rank: int  # largest rank among the batch's adapters (slots are zero-padded beyond it)
    targets: frozenset[str]  # projections any of the batch's adapters changes
    mask: torch.Tensor  # [T, S * rank]: 1 where a rank column belongs to the token's adapter (S = active slots)


@dataclass
class ForwardBatch:
    """Tensors for one model forward over the packed tokens of every scheduled chunk (T tokens, B chunks)."""

    input_ids: torch.Tensor  # [T] long: token ids, chunk after chunk
    positions: torch.Tensor  # [T] long: absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] long: flat KV slot (block_id * block_size + offset) to write each token to
    query_lens: list[int]  # [B] tokens of each chunk in this step
    context_lens: list[int]  # [B] tokens of KV each chunk attends over (cached + this step's)
    block_tables: torch.Tensor  # [B, max_blocks] long: each chunk's block ids, zero-padded
    logits_indices: torch.Tensor  # [S] long: packed index of the last token of each sampling chunk
    lora: LoraBatch | None = None  # None when no token uses an adapter

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)

"""Paged decode attention against a dense reference, on both of its code paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftserve.engine import model as model_mod
from ftserve.engine.batch import ForwardBatch
from ftserve.engine.model import _AttentionPlan


@pytest.mark.parametrize("small_limit", [0, 1 << 30], ids=["per-head-path", "one-shot-path"])
@pytest.mark.parametrize("rows", [[0, 1, 2], [1]], ids=["three-rows", "one-row"])
def test_paged_decode_attention_matches_dense_attention(
    small_limit: int, rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_mod, "SMALL_DECODE_TOKENS", small_limit)
    gen = torch.Generator().manual_seed(0)
    kv_heads, heads, dim, block_size, num_blocks = 3, 9, 16, 4, 20
    k_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen)
    # Scattered, non-contiguous blocks per row; one row alone has its last block partly filled.
    lengths = [[5, 11, 1][r] for r in rows]
    tables = [[[7, 2], [0, 13, 9], [19]][r] for r in rows]
    width = max(len(t) for t in tables)
    batch = ForwardBatch(
        input_ids=torch.zeros(len(rows), dtype=torch.long),
        positions=torch.tensor([n - 1 for n in lengths]),
        slot_mapping=torch.zeros(len(rows), dtype=torch.long),
        query_lens=[1] * len(rows),
        context_lens=lengths,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        logits_indices=torch.arange(len(rows)),
    )
    q = torch.randn(len(rows), heads, dim, generator=gen)
    got = _AttentionPlan(batch, block_size, num_blocks, torch.device("cpu")).attend(q, k_cache, v_cache)
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        slots = torch.tensor([b * block_size + o for b in table for o in range(block_size)])[:n]
        k = k_cache[:, slots].repeat_interleave(heads // kv_heads, dim=0)  # [H, n, D]
        v = v_cache[:, slots].repeat_interleave(heads // kv_heads, dim=0)
        want = F.scaled_dot_product_attention(q[row].unsqueeze(1), k, v).squeeze(1)
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)

"""Paged attention against a dense reference, on each of its code paths: torch's and the compiled kernel's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftserve.engine import attention as attention_mod
from ftserve.engine.attention import AttentionPlan
from ftserve.engine.batch import ForwardBatch
from ftserve.engine.kernels import PagedAttention, paged_attention_kernel

CPU = torch.device("cpu")


def kernel_for(path: str) -> PagedAttention | None:
    if not path.startswith("kernel"):
        return None
    kernel = paged_attention_kernel("auto", CPU)
    assert kernel is not None, "the paged-attention kernel did not build (see the log)"
    return kernel


@pytest.mark.parametrize("path", ["per-head", "one-shot", "kernel"])
@pytest.mark.parametrize("rows", [[0, 1, 2], [1]], ids=["three-rows", "one-row"])
def test_paged_decode_attention_matches_dense_attention(
    path: str, rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention_mod, "SMALL_DECODE_TOKENS", 0 if path == "per-head" else 1 << 30)
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
    plan = AttentionPlan(batch, block_size, num_blocks, CPU, heads // kv_heads, kernel_for(path))
    got = plan.attend(q, k_cache, v_cache)
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        slots = torch.tensor([b * block_size + o for b in table for o in range(block_size)])[:n]
        k = k_cache[:, slots].repeat_interleave(heads // kv_heads, dim=0)  # [H, n, D]
        v = v_cache[:, slots].repeat_interleave(heads // kv_heads, dim=0)
        want = F.scaled_dot_product_attention(q[row].unsqueeze(1), k, v).squeeze(1)
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("path", "dtype"),
    [
        ("masked-sdpa", torch.float32),
        ("masked-sdpa", torch.bfloat16),
        ("short-chunk", torch.float32),
        ("short-chunk", torch.bfloat16),
        ("kernel", torch.float32),
        ("kernel", torch.bfloat16),
        ("kernel-beside-sdpa", torch.float32),  # the chunk through SDPA, the decode row through the kernel
    ],
)
def test_a_short_chunk_attends_causally_over_its_paged_context(
    path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verify chunk (queries at the end of a sequence) next to a decode row: each query sees the keys up to
    its own position, through scattered blocks, on each code path."""
    monkeypatch.setattr(attention_mod, "SHORT_CHUNK", 0 if path in ("masked-sdpa", "kernel-beside-sdpa") else 16)
    gen = torch.Generator().manual_seed(1)
    kv_heads, heads, dim, block_size, num_blocks = 3, 9, 16, 4, 20
    k_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
    table, ctx, n = [11, 3, 17], 10, 5  # the chunk's queries sit at positions 5..9
    batch = ForwardBatch(
        input_ids=torch.zeros(n + 1, dtype=torch.long),
        positions=torch.tensor([*range(ctx - n, ctx), 2]),
        slot_mapping=torch.zeros(n + 1, dtype=torch.long),
        query_lens=[n, 1],
        context_lens=[ctx, 3],
        block_tables=torch.tensor([table, [5, 0, 0]]),
        logits_indices=torch.arange(n + 1),
    )
    q = torch.randn(n + 1, heads, dim, generator=gen).to(dtype)
    plan = AttentionPlan(batch, block_size, num_blocks, CPU, heads // kv_heads, kernel_for(path))
    got = plan.attend(q, k_cache, v_cache)
    slots = torch.tensor([b * block_size + o for b in table for o in range(block_size)])[:ctx]
    k = k_cache[:, slots].float().repeat_interleave(heads // kv_heads, dim=0)  # [H, ctx, D]
    v = v_cache[:, slots].float().repeat_interleave(heads // kv_heads, dim=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for j in range(n):
        seen = ctx - n + j + 1
        want = F.scaled_dot_product_attention(q[j].float().unsqueeze(1), k[:, :seen], v[:, :seen]).squeeze(1)
        torch.testing.assert_close(got[j].float(), want, rtol=tol, atol=tol)
    decode_k = k_cache[:, 20:23].float().repeat_interleave(heads // kv_heads, dim=0)
    decode_v = v_cache[:, 20:23].float().repeat_interleave(heads // kv_heads, dim=0)
    want = F.scaled_dot_product_attention(q[n].float().unsqueeze(1), decode_k, decode_v).squeeze(1)
    torch.testing.assert_close(got[n].float(), want, rtol=tol, atol=tol)

"""With the compiled CPU kernels a token's logits are the same bits however it is batched: in a 1-row decode
step, as the first token of a 5-token speculative verify, or beside another sequence's rows. That is what keeps
greedy speculative decoding equal to plain decoding in bfloat16 (test_speculative_engine.py checks the tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftserve.engine.kernels import paged_attention_kernel, rows_linear_kernel
from ftserve.engine.model import KVCache, NativeLlama
from ftserve.engine.runner import Piece, pack

CPU = torch.device("cpu")
BLOCK = 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tokens_logits_do_not_depend_on_its_batch(model_dir: Path, dtype: torch.dtype) -> None:
    model = NativeLlama.from_dir(model_dir, CPU, dtype)
    linear = rows_linear_kernel("auto", CPU)
    assert linear is not None
    model.use_linear_kernel(linear)
    cache = KVCache(model.shape, 16, BLOCK, dtype, CPU, paged_attention_kernel("auto", CPU))
    gen = torch.Generator().manual_seed(11)
    prompt, other = (torch.randint(100, 5000, (n,), generator=gen).tolist() for n in (37, 52))
    mine, theirs = [1, 2, 3, 4], [5, 6, 7, 8, 9]
    model.forward(pack([Piece(prompt, 0, mine, 1), Piece(other, 0, theirs, 1)], BLOCK, CPU), cache)
    nxt = torch.randint(100, 5000, (5,), generator=gen).tolist()

    alone = model.forward(pack([Piece(nxt[:1], len(prompt), mine, 1)], BLOCK, CPU), cache)
    verify = model.forward(pack([Piece(nxt, len(prompt), mine, 5)], BLOCK, CPU), cache)
    beside = model.forward(
        pack([Piece(other[-3:], len(other) - 3, theirs, 3), Piece(nxt[:1], len(prompt), mine, 1)], BLOCK, CPU),
        cache,
    )
    assert torch.equal(alone[0], verify[0])
    assert torch.equal(alone[0], beside[-1])

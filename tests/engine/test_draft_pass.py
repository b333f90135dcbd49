"""The compiled draft pass (draft_layers.cpp): an INT8 draft's layers in one call compute what the model's
Python forward computes (up to the float32-vs-bfloat16 activations), write the same keys and values, and
refuse what they cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftserve.config import SpeculativeConfig
from ftserve.engine.draft_model import DraftModel, load_draft
from ftserve.engine.draft_pass import CompiledPass
from ftserve.engine.kernels import draft_layers_kernel, paged_attention_kernel, rows_linear_kernel
from ftserve.engine.model import KVCache, NativeLlama
from ftserve.engine.runner import Piece, pack

CPU = torch.device("cpu")
BLOCK = 16


@pytest.mark.parametrize(("m", "n", "k"), [(1, 960, 576), (3, 7, 570), (6, 1029, 64), (5, 4, 1536)])
def test_int8_linear_matches_a_float_matmul(m: int, n: int, k: int) -> None:
    """Tails in every dimension: token rows past a tile of 4, weight rows past a tile of 4, K past 16 lanes."""
    assert draft_layers_kernel("auto", CPU) is not None
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) / 64
    want = x.double() @ (w.double() * scales.double()[:, None]).T
    got = torch.ops.ftserve.int8_linear(x, w, scales)
    assert got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.fixture(scope="module")
def int8_draft(model_dir: Path, native_model: NativeLlama) -> DraftModel:
    draft = load_draft(SpeculativeConfig(drafter="draft-model", draft_quantize="int8"), model_dir, native_model)
    return draft


def _context(target: NativeLlama, lengths: list[int]) -> tuple[KVCache, list[list[int]]]:
    """A float32 cache holding the target's KV for random prompts of ``lengths`` (one block table each)."""
    cache = KVCache(target.shape, 40, BLOCK, torch.float32, CPU, paged_attention_kernel("auto", CPU))
    gen = torch.Generator().manual_seed(5)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(lengths))]
    for n, table in zip(lengths, tables, strict=True):
        tokens = torch.randint(0, target.shape.vocab_size, (n,), generator=gen).tolist()
        target.forward(pack([Piece(tokens, 0, table, 1)], BLOCK, CPU), cache)
    return cache, tables


@pytest.mark.parametrize("lengths", [[37], [37, 90, 5]])
def test_the_compiled_pass_computes_what_the_python_forward_does(
    native_model: NativeLlama, int8_draft: DraftModel, lengths: list[int]
) -> None:
    """One drafted token per sequence after a context of the target's KV: the same logits and the same KV written at
    the slots, up to the activations' precision (bfloat16 in Python, float32 here)."""
    compiled = CompiledPass.build(draft_layers_kernel("auto", CPU), int8_draft.model, None)
    assert compiled is not None
    cache, tables = _context(native_model, lengths)
    batch = pack([Piece([100 + i], n, table, 1) for i, (n, table) in enumerate(zip(lengths, tables, strict=True))],
                 BLOCK, CPU)  # fmt: skip
    assert compiled.applies(batch, cache)
    want = int8_draft.model.forward(batch, cache)
    want_k, want_v = cache.k[:, :, batch.slot_mapping].clone(), cache.v[:, :, batch.slot_mapping].clone()
    cache.k[:, :, batch.slot_mapping] = 0.0
    cache.v[:, :, batch.slot_mapping] = 0.0
    got = compiled(batch, cache)
    assert got.shape == want.shape and got.dtype == torch.float32
    logit_error = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(logit_error.max()) < 0.05
    for cached, written in ((cache.k, want_k), (cache.v, want_v)):  # every layer's, within bfloat16's noise
        error = (cached[:, :, batch.slot_mapping] - written).flatten(1).norm(dim=1) / written.flatten(1).norm(dim=1)
        assert float(error.max()) < 0.05  # measured up to 0.021 by the last layer; a wrong rope gives ~1


def test_only_int8_drafts_on_cpu_get_a_compiled_pass(native_model: NativeLlama, int8_draft: DraftModel) -> None:
    op = draft_layers_kernel("auto", CPU)
    assert CompiledPass.build(op, native_model, None) is None  # dense layers keep the Python forward
    assert CompiledPass.build(None, int8_draft.model, None) is None  # no kernel
    assert draft_layers_kernel("torch", CPU) is None
    truncated = CompiledPass.build(op, int8_draft.model, 3)
    assert truncated is not None and len(truncated.weights) == 3 * 10


def test_binding_with_the_kernels_compiles_the_passes(native_model: NativeLlama, int8_draft: DraftModel) -> None:
    cache = KVCache(native_model.shape, 8, BLOCK, torch.float32, CPU, paged_attention_kernel("auto", CPU))
    int8_draft.bind(cache, native_model.shape, rows_linear_kernel("auto", CPU))
    assert int8_draft.compiled is not None
    int8_draft.bind(cache, native_model.shape, None)  # linear_kernel: torch keeps every pass in Python
    assert int8_draft.compiled is None


def test_bad_weights_get_a_clear_error(int8_draft: DraftModel) -> None:
    compiled = CompiledPass.build(draft_layers_kernel("auto", CPU), int8_draft.model, 2)
    assert compiled is not None
    s = int8_draft.model.shape
    cache = KVCache(s, 2, BLOCK, torch.float32, CPU)
    one = torch.zeros(1, dtype=torch.long)
    args = (cache.k, cache.v, one, one, torch.zeros(1, 1, dtype=torch.long), compiled.cos, compiled.sin)
    h = torch.zeros(1, s.hidden_size)
    with pytest.raises(RuntimeError, match="10 tensors per layer"):
        torch.ops.ftserve.draft_layers(h, compiled.weights[:9], *args, s.num_heads, s.num_kv_heads, BLOCK, 1e-5)
    first = compiled.weights[:10]
    swapped = [first[0], first[3], first[2], first[1], *first[4:]]  # o's weight where qkv's belongs
    with pytest.raises(RuntimeError, match="a projection"):
        torch.ops.ftserve.draft_layers(h, swapped, *args, s.num_heads, s.num_kv_heads, BLOCK, 1e-5)
    with pytest.raises(RuntimeError, match="slot out of range"):
        bad = (cache.k, cache.v, torch.tensor([10_000]), *args[3:])
        torch.ops.ftserve.draft_layers(h, compiled.weights[:10], *bad, s.num_heads, s.num_kv_heads, BLOCK, 1e-5)

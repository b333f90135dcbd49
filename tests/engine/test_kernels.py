"""The compiled CPU kernels: when they are used, how they fail, that paged attention never reads out of bounds, and
that both give a token the same bits whatever else shares the call."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.utils.cpp_extension

from ftserve.engine import kernels
from ftserve.engine.kernels import RowsLinear, paged_attention_kernel, rows_linear_kernel

CPU = torch.device("cpu")


def test_torch_choice_and_other_devices_take_the_torch_path() -> None:
    assert paged_attention_kernel("torch", CPU) is None
    assert paged_attention_kernel("auto", torch.device("meta")) is None
    assert rows_linear_kernel("torch", CPU) is None
    assert rows_linear_kernel("auto", torch.device("meta")) is None


def test_a_kernel_that_cannot_be_built_leaves_the_torch_path_with_the_reason_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(**_: object) -> None:
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="ftserve.engine.kernels"):
        assert kernels._compile() is False
    assert "c++: command not found" in caplog.text


def test_the_kernel_refuses_block_ids_and_lengths_outside_the_cache() -> None:
    kernel = paged_attention_kernel("auto", CPU)
    assert kernel is not None
    k = v = torch.zeros(3, 8 * 4, 16)  # 8 blocks of 4 slots
    q = torch.zeros(1, 9, 16)
    one = torch.zeros(1, dtype=torch.long)
    good_table = torch.tensor([[1, 2]])
    assert kernel(q, k, v, good_table, one, torch.tensor([8]), 4, 0.25).shape == q.shape
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernel(q, k, v, torch.tensor([[1, 8]]), one, torch.tensor([8]), 4, 0.25)
    with pytest.raises(RuntimeError, match="length out of range"):
        kernel(q, k, v, good_table, one, torch.tensor([9]), 4, 0.25)
    with pytest.raises(RuntimeError, match="row out of range"):
        kernel(q, k, v, good_table, torch.ones(1, dtype=torch.long), torch.tensor([8]), 4, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_alone_or_beside_longer_ones(dtype: torch.dtype) -> None:
    """What a query computes depends on that query alone: a token attends alike in a decode step and in a
    speculative verify beside other sequences (greedy speculation relies on it)."""
    kernel = paged_attention_kernel("auto", CPU)
    assert kernel is not None
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, 40 * 4, 16, generator=gen).to(dtype)
    v = torch.randn(3, 40 * 4, 16, generator=gen).to(dtype)
    q = torch.randn(3, 9, 16, generator=gen).to(dtype)
    tables = torch.tensor([[5, 9, 2, 0, 0, 0, 0, 0, 0, 0], [11, 3, 17, 30, 31, 32, 33, 34, 35, 36]])
    rows, lens = torch.tensor([0, 1, 1]), torch.tensor([10, 37, 38])
    together = kernel(q, k, v, tables, rows, lens, 4, 0.25)
    for t in range(3):
        alone = kernel(q[t : t + 1].contiguous(), k, v, tables, rows[t : t + 1], lens[t : t + 1], 4, 0.25)
        assert torch.equal(alone[0], together[t])


def linear_operands(
    seed: int, rows: int, k: int, n: int, dtype: torch.dtype
) -> tuple[RowsLinear, torch.Tensor, torch.Tensor]:
    """The projection kernel, x [rows, k] and w [n, k] drawn from ``seed``."""
    kernel = rows_linear_kernel("auto", CPU)
    assert kernel is not None
    gen = torch.Generator().manual_seed(seed)
    return kernel, torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)


# K = 70 and N = 11 leave tails after whole vector widths and weight tiles; 23 rows leave one after row tiles.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_linear_computes_x_times_w_transposed(dtype: torch.dtype) -> None:
    kernel, x, w = linear_operands(5, 23, 70, 11, dtype)
    out = kernel(x, w)
    assert out.shape == (23, 11) and out.dtype == dtype
    want = x.double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (8 bits of mantissa)
    torch.testing.assert_close(out.double(), want, atol=tol * 10, rtol=tol)
    assert kernel(x[:0].contiguous(), w).shape == (0, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_alone_or_among_any_rows(dtype: torch.dtype) -> None:
    """A token's projection in a decode step (1 row), a speculative verify (5) or a prefill chunk (many) is the
    same, bit for bit: greedy speculation then picks the same tokens as plain decoding."""
    kernel, x, w = linear_operands(6, 40, 1536, 64, dtype)
    together = kernel(x, w)
    for t in range(40):
        assert torch.equal(kernel(x[t : t + 1].contiguous(), w)[0], together[t])
    assert torch.equal(kernel(x[3:8].contiguous(), w), together[3:8])


def test_rows_linear_refuses_mismatched_inputs() -> None:
    kernel = rows_linear_kernel("auto", CPU)
    assert kernel is not None
    with pytest.raises(RuntimeError, match="float32 or bfloat16, the same"):
        kernel(torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"x \[M, K\], w \[N, K\]"):
        kernel(torch.zeros(2, 8), torch.zeros(3, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.zeros(8, 2).t(), torch.zeros(3, 8))

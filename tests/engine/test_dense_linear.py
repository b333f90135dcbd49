"""The dense projection's CPU float32 path (weight-first matmul) computes the same product as ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from ftserve.engine.kernels import rows_linear_kernel
from ftserve.engine.qlinear import DenseLinear, Int8Linear, dense_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_linear_matches_f_linear(rows: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    out = dense_linear(x, weight)
    assert out.shape == (rows, 96) and out.dtype == dtype and out.is_contiguous()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), F.linear(x, weight).float(), atol=tol, rtol=tol)


def test_dense_linear_keeps_leading_dims() -> None:
    layer = DenseLinear(torch.randn(24, 16))
    x = torch.randn(2, 3, 16)
    out = layer(x)
    assert out.shape == (2, 3, 24) and layer.out_features == 24
    torch.testing.assert_close(out, F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_padded_row_counts_give_each_row_what_the_next_count_gives_it(rows: int) -> None:
    """1 and 3 rows are padded to 2 and 4 (MKL's faster counts here); the padding never shows in the output."""
    weight = torch.randn(128, 64)
    x = torch.randn(rows + 1, 64)
    assert dense_linear(x[:rows], weight).shape == (rows, 128)
    torch.testing.assert_close(dense_linear(x[:rows], weight), dense_linear(x, weight)[:rows], atol=1e-6, rtol=1e-6)


def test_one_row_equals_that_row_in_a_pair() -> None:
    """A decode step (one row) and a two-row step give a token the same logits, so greedy choices agree."""
    weight = torch.randn(128, 64)
    x = torch.randn(2, 64)
    torch.testing.assert_close(dense_linear(x[:1], weight)[0], dense_linear(x, weight)[0], atol=1e-6, rtol=1e-6)


def test_the_row_invariant_kernel_runs_dense_cpu_weights_only() -> None:
    kernel = rows_linear_kernel("auto", torch.device("cpu"))
    assert kernel is not None
    layer = DenseLinear(torch.randn(24, 16, dtype=torch.bfloat16))
    layer.use_kernel(kernel)
    assert layer.kernel is kernel and layer.matmul_rows(3) == 3  # no padding: its cost follows the rows
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight).float(), atol=5e-2, rtol=2e-2)
    for other in (torch.randn(24, 16, dtype=torch.float16), torch.randn(16, 24).t()):  # float16; a strided view
        layer = DenseLinear(other)
        layer.use_kernel(kernel)
        assert layer.kernel is None  # F.linear
    int8 = Int8Linear(torch.ones(24, 16, dtype=torch.int8), torch.ones(24), torch.float32)
    int8.use_kernel(kernel)  # quantized weights keep their own matmul
    assert not hasattr(int8, "kernel")

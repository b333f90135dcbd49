"""GPTQ by its defining property: lower layer output error than round-to-nearest at the same bits/group."""

from __future__ import annotations

import torch

from ftserve.engine.qlinear import dequantize_int4, pack_int4
from ftserve.optimize.gptq import gptq_quantize
from ftserve.optimize.quantize import get_quantizer


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ w.T - x @ w_hat.T) ** 2).mean())


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k, samples = 64, 256, 2048
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)  # correlated features, like activations
    x = torch.randn(samples, k, generator=gen) @ mix
    w = torch.randn(n, k, generator=gen) * 0.05
    hessian = 2 * x.T @ x / samples
    q, scales, zeros = gptq_quantize(w, hessian, group_size=64)
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (n, 4)
    w_gptq = dequantize_int4(pack_int4(q), scales, zeros)
    rtn = get_quantizer("int4", group_size=64).quantize_weight("w", w, {})
    w_rtn = dequantize_int4(rtn["qweight"], rtn["scales"], rtn["zeros"])
    err_gptq, err_rtn = output_error(x, w, w_gptq), output_error(x, w, w_rtn)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_do_not_break_the_factorisation() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=gen)
    x[:, 5] = 0.0
    w = torch.randn(16, 128, generator=gen)
    q, _, _ = gptq_quantize(w, 2 * x.T @ x / 512, group_size=64)
    assert torch.isfinite(q.float()).all()

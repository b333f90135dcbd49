"""GPTQ by its defining property: lower layer output error than round-to-nearest at the same bits/group."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ftserve.engine.model import ModelShape, read_state
from ftserve.engine.qlinear import dequantize_int4, pack_int4
from ftserve.optimize.gptq import GPTQSettings, gptq_model, gptq_quantize, run_decoder
from ftserve.optimize.quantize import get_quantizer, int4_params, quantize_int4_with


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ w.T - x @ w_hat.T) ** 2).mean())


@pytest.mark.parametrize(
    "settings",
    [GPTQSettings(), GPTQSettings(sym=True), GPTQSettings(sym=True, act_order=True),
     GPTQSettings(act_order=True, clip_search=True)],
    ids=["asym", "sym", "sym-act-order", "act-order-clip"],
)  # fmt: skip
def test_gptq_beats_round_to_nearest_on_correlated_inputs(settings: GPTQSettings) -> None:
    """Same bits, group size and grid (and clip search) as RTN; lower layer output error."""
    gen = torch.Generator().manual_seed(0)
    n, k, samples = 64, 256, 2048
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)  # correlated features, like activations
    scale = torch.linspace(0.2, 3.0, k)[torch.randperm(k, generator=gen)]  # inputs of unequal energy
    x = (torch.randn(samples, k, generator=gen) @ mix) * scale
    w = torch.randn(n, k, generator=gen) * 0.05
    hessian = 2 * x.T @ x / samples
    q, scales, zeros = gptq_quantize(w, hessian, settings)
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (n, 4)
    if settings.sym:
        assert torch.count_nonzero(zeros) == 0
    w_gptq = dequantize_int4(pack_int4(q), scales, zeros)
    rtn_scales, rtn_zeros = int4_params(w, 64, settings.sym, settings.clip_search)
    w_rtn = dequantize_int4(pack_int4(quantize_int4_with(w, rtn_scales, rtn_zeros)), rtn_scales, rtn_zeros)
    err_gptq, err_rtn = output_error(x, w, w_gptq), output_error(x, w, w_rtn)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_clip_search_never_rounds_worse_than_the_full_range() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    w[0, 0] = 8.0  # an outlier: clipping it lets the rest of its group round finer
    for sym in (True, False):
        errors = []
        for clip in (False, True):
            scales, zeros = int4_params(w, 64, sym, clip)
            errors.append(((dequantize_int4(pack_int4(quantize_int4_with(w, scales, zeros)), scales, zeros) - w) ** 2)
                          .view(32, 2, 64).sum(-1))  # fmt: skip
        assert bool((errors[1] <= errors[0] + 1e-6).all()) and bool((errors[1] < errors[0]).any())


def test_dead_inputs_do_not_break_the_factorisation() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=gen)
    x[:, 5] = 0.0
    w = torch.randn(16, 128, generator=gen)
    q, _, _ = gptq_quantize(w, 2 * x.T @ x / 512, GPTQSettings(group_size=64, act_order=True))
    assert torch.isfinite(q.float()).all()


def test_the_calibration_decoder_is_the_model(model_dir: Path) -> None:
    """The layer-by-layer fp32 forward GPTQ calibrates on gives the Hugging Face model's logits."""
    from transformers import AutoModelForCausalLM

    state = read_state(model_dir)
    shape = ModelShape.from_dir(model_dir)
    seqs = [[1, 504, 3458, 314, 260, 2613, 28], [1, 2113, 11, 919]]
    hidden = run_decoder(shape, state, seqs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for ids, h in zip(seqs, hidden, strict=True):
        with torch.inference_mode():
            expected = hf(input_ids=torch.tensor([ids])).logits[0]
        got = h @ state["model.embed_tokens.weight"].float().T
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


def test_sequential_gptq_replaces_each_projection_once_and_beats_rtn_on_layer_output(model_dir: Path) -> None:
    """Every projection of a (two-layer) model is quantized once; layer outputs beat round-to-nearest."""
    state = read_state(model_dir)
    shape = dataclasses.replace(ModelShape.from_dir(model_dir), num_layers=2)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(100, 20000, (48,), generator=gen).tolist() for _ in range(12)]
    quantized = gptq_model(shape, state, seqs, GPTQSettings(group_size=64))
    assert len(quantized) == 2 * 7
    rtn = get_quantizer("int4", group_size=64)

    def final_hidden(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(run_decoder(shape, {**state, **weights}, seqs))

    exact = final_hidden({})
    with_gptq = final_hidden({k: dequantize_int4(pack_int4(q), s, z) for k, (q, s, z) in quantized.items()})
    with_rtn = {}
    for key in quantized:
        parts = rtn.quantize_weight(key, state[key], {})
        with_rtn[key] = dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"])
    err_gptq = float(((with_gptq - exact) ** 2).mean())
    err_rtn = float(((final_hidden(with_rtn) - exact) ** 2).mean())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)

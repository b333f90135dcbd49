"""Weight-only quantizers and the engine's quantized linears: layouts, error bounds, kernel agreement."""

from __future__ import annotations

import pytest
import torch

from ftserve.engine.qlinear import (
    DenseLinear,
    Int4Linear,
    Int8Linear,
    build_linear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    unpack_int4,
)
from ftserve.optimize.quantize import QuantizeError, get_quantizer, int4_params, quantize_head, quantize_int8

CPU = torch.device("cpu")


def weight(n: int = 96, k: int = 576, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int4_pack_round_trips() -> None:
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_int8_error_is_within_half_a_step() -> None:
    w = weight()
    q = quantize_int8(w)
    err = (dequantize_int8(q["qweight"], q["scales"]) - w).abs()
    assert (err <= q["scales"][:, None] / 2 + 1e-7).all()


def test_int4_error_is_within_one_step_of_its_group_and_zero_points_are_integers() -> None:
    w = weight()
    q = get_quantizer("int4", group_size=64).quantize_weight("w", w, {})
    scales, zeros = int4_params(w, 64)
    err = (dequantize_int4(q["qweight"], q["scales"], q["zeros"]) - w).abs().view(96, 9, 64)
    assert (err <= scales[..., None] + 1e-6).all()
    zero_point = 8 - zeros / scales
    torch.testing.assert_close(zero_point, zero_point.round())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_equal_a_matmul_with_the_dequantized_weight(dtype: torch.dtype) -> None:
    w, x = weight(), torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    tol = 1e-4 if dtype == torch.float32 else 0.1
    q8 = quantize_int8(w)
    ref8 = x.to(dtype) @ dequantize_int8(q8["qweight"], q8["scales"]).to(dtype).T
    torch.testing.assert_close(Int8Linear(q8["qweight"], q8["scales"], dtype)(x.to(dtype)), ref8, atol=tol, rtol=0.02)
    q4 = get_quantizer("int4", group_size=64).quantize_weight("w", w, {})
    ref4 = x.to(dtype) @ dequantize_int4(q4["qweight"], q4["scales"], q4["zeros"]).to(dtype).T
    out4 = Int4Linear(q4["qweight"], q4["scales"], q4["zeros"], dtype)(x.to(dtype))
    torch.testing.assert_close(out4, ref4, atol=tol, rtol=0.02)


def test_fused_projections_concatenate_rows() -> None:
    parts = [get_quantizer("int8").quantize_weight("w", weight(seed=s), {}) for s in range(3)]
    fused = build_linear(parts, CPU, torch.float32)
    x = torch.randn(2, 576)
    separate = torch.cat([Int8Linear(p["qweight"], p["scales"], torch.float32)(x) for p in parts], dim=-1)
    torch.testing.assert_close(fused(x), separate)
    dense = build_linear([{"weight": weight()}], CPU, torch.float32)
    assert isinstance(dense, DenseLinear)


def test_convert_quantizes_only_decoder_linears() -> None:
    state = {
        "model.embed_tokens.weight": weight(100, 64),
        "model.layers.0.self_attn.q_proj.weight": weight(64, 64),
        "model.layers.0.mlp.down_proj.weight": weight(64, 128),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "lm_head.weight": weight(100, 64),
    }
    out = get_quantizer("int4", group_size=64).convert(state, {})
    assert out["model.embed_tokens.weight"] is state["model.embed_tokens.weight"]
    assert "lm_head.weight" in out and "model.layers.0.input_layernorm.weight" in out
    assert {"model.layers.0.self_attn.q_proj.qweight", "model.layers.0.mlp.down_proj.zeros"} <= set(out)
    assert "model.layers.0.self_attn.q_proj.weight" not in out


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_gets_its_own_int8_copy_and_the_embedding_stays_dense(tied: bool) -> None:
    embed, head = weight(100, 64, seed=1), weight(100, 64, seed=2)
    state = {"model.embed_tokens.weight": embed} | ({} if tied else {"lm_head.weight": head})
    out = quantize_head(state)
    assert out["model.embed_tokens.weight"] is embed and "lm_head.weight" not in out
    assert out["lm_head.qweight"].dtype == torch.int8 and out["lm_head.qweight"].shape == (100, 64)
    scales = out["lm_head.scales"]
    err = (dequantize_int8(out["lm_head.qweight"], scales) - (embed if tied else head)).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())  # each row on its own grid, rounded to nearest
    assert "lm_head.weight" in state or tied  # the input state is left as it was


def test_bad_settings_fail_before_any_work() -> None:
    with pytest.raises(QuantizeError, match=r"known: .*int4.*int8"):
        get_quantizer("int3")
    state = {"model.layers.0.mlp.down_proj.weight": weight(64, 576)}
    with pytest.raises(QuantizeError, match="576"):
        get_quantizer("int4", group_size=128).check(state)
    with pytest.raises(QuantizeError, match="not supported"):
        get_quantizer("int4", group_size=48).check(state)

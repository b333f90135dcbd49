"""Exports: the GPTQ layout of a symmetric 4-bit state is exact, and states an engine cannot load are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftserve.engine.qlinear import dequantize_int4, dequantize_int8
from ftserve.optimize.export import from_gptq, gptq_config, gptq_state, pack_int32, to_gptq, unpack_int32
from ftserve.optimize.merge import write_model
from ftserve.optimize.quantize import QuantizeError, get_quantizer, quantize_head


def test_int32_packing_round_trips_along_either_dimension() -> None:
    values = torch.randint(0, 16, (16, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    for dim in (0, 1):
        packed = pack_int32(values, dim)
        assert packed.dtype == torch.int32
        assert packed.shape == ((2, 24) if dim == 0 else (16, 3))
        assert torch.equal(unpack_int32(packed, dim), values)
    # the first value sits in the lowest bits: a word of 0..7 reads 0x76543210
    assert int(pack_int32(torch.arange(8, dtype=torch.int32).view(8, 1), 0)) == 0x76543210


def test_gptq_layout_dequantizes_to_the_same_weights() -> None:
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    parts = get_quantizer("int4", group_size=64, sym=True).quantize_weight("w", w, {})
    layout = to_gptq(parts["qweight"], parts["scales"], parts["zeros"])
    assert layout["qweight"].shape == (16, 96) and layout["qzeros"].shape == (2, 12)
    assert layout["scales"].shape == (2, 96) and layout["scales"].dtype == torch.float16
    assert layout["g_idx"].tolist() == [k // 64 for k in range(128)]
    native = dequantize_int4(parts["qweight"], parts["scales"].half().float(), parts["zeros"])
    torch.testing.assert_close(from_gptq(layout), native)


def test_symmetric_grid_has_no_zero_point_and_bounds_the_error() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    parts = get_quantizer("int4", group_size=64, sym=True).quantize_weight("w", w, {})
    assert torch.count_nonzero(parts["zeros"]) == 0
    err = (dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"]) - w).abs()
    assert bool((err <= parts["scales"][:, :1] / 2 + 1e-6).all())


@pytest.mark.parametrize(("method", "sym", "match"), [("int4", False, "asymmetric"), ("int8", True, "8-bit")])
def test_vllm_export_refuses_what_vllm_cannot_load(method: str, sym: bool, match: str) -> None:
    quant = get_quantizer(method, sym=sym).config()
    with pytest.raises(QuantizeError, match=match):
        gptq_state({}, quant, tied=True)


def test_vllm_export_folder_is_a_standard_gptq_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 128),
        "model.norm.weight": torch.ones(128),
    }
    quantizer = get_quantizer("int4", group_size=64, sym=True)
    quantized = quantizer.convert(state, {})
    write_model(tmp_path, model_dir, gptq_state(quantized, quantizer.config(), tied=True), {
        "quantization_config": gptq_config(quantizer.config())})  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["sym"] and not config["desc_act"]
    saved = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    assert {k.removeprefix(prefix) for k in saved if k.startswith(prefix)} == {"qweight", "qzeros", "scales", "g_idx"}
    assert saved[prefix + "qweight"].dtype == torch.int32
    assert (tmp_path / "tokenizer.json").is_file()


@pytest.mark.parametrize("tied", [True, False])
def test_vllm_export_gives_the_int8_head_back_as_vllm_ties_or_loads_it(tied: bool) -> None:
    """vLLM's GPTQ layout has no INT8 head: a tied one is dropped (vLLM ties it to the embedding), an untied one
    is written back dense, as its INT8 values."""
    embed = torch.randn(100, 128)
    state = {"model.embed_tokens.weight": embed, "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 128)}
    if not tied:
        state["lm_head.weight"] = torch.randn(100, 128)
    quantizer = get_quantizer("int4", group_size=64, sym=True)
    quantized = quantize_head(quantizer.convert(state, {}))
    out = gptq_state(quantized, quantizer.config(), tied=tied)
    assert not {"lm_head.qweight", "lm_head.scales"} & set(out)
    assert out["model.embed_tokens.weight"] is embed
    if tied:
        assert "lm_head.weight" not in out
    else:
        expected = dequantize_int8(quantized["lm_head.qweight"], quantized["lm_head.scales"])
        torch.testing.assert_close(out["lm_head.weight"], expected)

"""The native engine serves quantized checkpoints through the packed kernels, and they stay accurate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftserve.engine.loader import HFTokenizer
from ftserve.engine.model import NativeLlama, read_state
from ftserve.engine.qlinear import Int4Linear, Int8Linear, dequantize_int4, dequantize_int8
from ftserve.optimize.merge import write_model
from ftserve.optimize.quality import perplexity, sequence_logits
from ftserve.optimize.quantize import get_quantizer

CPU = torch.device("cpu")
TEXT = (
    "Bread is one of the oldest prepared foods. Flour, water, salt and a little yeast are enough; time does "
    "the rest. As the dough rests, the yeast feeds on sugars in the flour and releases gas, which the stretchy "
    "gluten network traps in small pockets. Baking sets that structure and browns the crust."
)


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float checkpoint whose weights are exactly the quantized grid values."""
    out = {}
    for key, value in state.items():
        if key.endswith(".qweight"):
            base = key.removesuffix(".qweight")
            zeros = state.get(f"{base}.zeros")
            scales = state[f"{base}.scales"]
            w = dequantize_int8(value, scales) if zeros is None else dequantize_int4(value, scales, zeros)
            out[f"{base}.weight"] = w
        elif not key.endswith((".scales", ".zeros")):
            out[key] = value
    return out


@pytest.fixture(scope="module")
def folders(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    state = read_state(model_dir)
    out = {}
    for name, settings in (("int8", {}), ("int4", {"group_size": 64})):
        quantizer = get_quantizer(name, **settings)
        qstate = quantizer.convert(state, quantizer.prepare(state))
        write_model(root / name, model_dir, qstate, {"quantization_config": quantizer.config()})
        write_model(root / f"{name}-dequantized", model_dir, dequantized(qstate))
        out[name] = root / name
        out[f"{name}-dequantized"] = root / f"{name}-dequantized"
    return out


@pytest.mark.parametrize(("name", "kind"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_checkpoint_runs_the_packed_kernel_and_equals_its_dequantized_twin(
    folders: dict[str, Path], model_dir: Path, name: str, kind: type
) -> None:
    ids = HFTokenizer(model_dir).encode(TEXT)
    quant = NativeLlama.from_dir(folders[name], CPU, torch.float32)
    assert all(isinstance(getattr(layer, p), kind) for layer in quant.layers for p in ("qkv", "o", "gate_up", "down"))
    twin = NativeLlama.from_dir(folders[f"{name}-dequantized"], CPU, torch.float32)
    torch.testing.assert_close(sequence_logits(quant, ids), sequence_logits(twin, ids), atol=2e-3, rtol=1e-3)


def test_int8_keeps_perplexity_close_and_int4_costs_more(folders: dict[str, Path], model_dir: Path) -> None:
    ids = HFTokenizer(model_dir).encode(TEXT)
    ppl = {
        name: perplexity(NativeLlama.from_dir(path, CPU, torch.float32), ids)
        for name, path in (("dense", model_dir), ("int8", folders["int8"]), ("int4", folders["int4"]))
    }
    assert ppl["int8"] <= ppl["dense"] * 1.05, ppl
    assert ppl["int4"] > ppl["int8"], ppl

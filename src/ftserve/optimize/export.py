"""Exports: the folder each engine loads, written from the state the recipe has reached.

- ``native``: HF layout, quantized linears in ``ftserve.engine.qlinear``'s layout, ``quantization_config``
  with ``quant_method: ftserve``; what ``bentos/*.yaml`` selects with ``model:``.
- ``vllm``: an unquantized (or merged) model as is, or a 4-bit state (``int4``/``gptq`` with ``sym: true``)
  in the standard GPTQ layout (AutoGPTQ "v1" checkpoint format):

  * ``<name>.qweight`` int32 [K/8, N]: eight 4-bit values of consecutive *input* rows per word, row 8i+b
    in bits 4b..4b+3;
  * ``<name>.qzeros`` int32 [K/g, N/8]: zero points minus one, eight output columns per word;
  * ``<name>.scales`` float16 [K/g, N]; ``<name>.g_idx`` int32 [K] = k // g (no act-order);
  * ``quantization_config``: ``{quant_method: gptq, bits: 4, group_size, sym: true, desc_act: false}``.

  vLLM 0.32 takes only symmetric 4-bit GPTQ (its ``(bits, sym)`` table has no asymmetric entry); an
  asymmetric or INT8 state is refused with that reason before anything is written.
- ``tensorrt-llm``: the unquantized HF folder plus the exact build commands, marked not built here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ftserve.engine.model import ModelShape
from ftserve.engine.qlinear import dequantize_int8, unpack_int4
from ftserve.optimize.merge import write_model
from ftserve.optimize.quantize import QuantizeError
from ftserve.optimize.recipe import ExportStep, Recipe

PACK = 8  # 4-bit values per int32

TRTLLM_NOTE = (
    "Not built here: the tensorrt-llm package cannot be installed on these machines (its PyPI entry is a stub "
    "that downloads from NVIDIA's index). Run these commands where it is installed, with a GPU."
)


INT8_HEAD = ("lm_head.qweight", "lm_head.scales")  # the optimize stage's INT8 head (quantize.quantize_head)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words → the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack 4-bit values (0..15) eight at a time along ``dim`` (0 or 1) into int32, first value lowest."""
    v = values.to(torch.int64)
    if dim == 0:
        v = v.view(-1, PACK, v.shape[1])
        return _to_int32(sum(v[:, b, :] << (4 * b) for b in range(PACK)))
    v = v.view(v.shape[0], -1, PACK)
    return _to_int32(sum(v[:, :, b] << (4 * b) for b in range(PACK)))


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words → 4-bit values as int32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (4 * b)) & 0xF for b in range(PACK)]
    stacked = torch.stack(parts, dim=dim + 1)  # [..., PACK, ...] right after the packed dim
    shape = list(words.shape)
    shape[dim] *= PACK
    return stacked.reshape(shape).to(torch.int32)


def to_gptq(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """One symmetric 4-bit linear from the native layout (W ≈ (q - 8) · scale) to the GPTQ layout."""
    if bool(zeros.abs().max() > 0):
        raise QuantizeError("the GPTQ export needs a symmetric grid (quantize with sym: true)")
    q = unpack_int4(qweight)  # [N, K]
    n, k = q.shape
    groups = scales.shape[1]
    return {
        "qweight": pack_int32(q.T.contiguous(), dim=0),
        "qzeros": pack_int32(torch.full((groups, n), 8 - 1, dtype=torch.int32), dim=1),
        "scales": scales.T.contiguous().to(torch.float16),
        "g_idx": (torch.arange(k) // (k // groups)).to(torch.int32),
    }


def from_gptq(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense weight [N, K] of one GPTQ-layout linear (v1 zero points: stored value + 1)."""
    q = unpack_int32(tensors["qweight"], dim=0).T.float()  # [N, K]
    zp = unpack_int32(tensors["qzeros"], dim=1).T.float() + 1  # [N, K/g]
    scales = tensors["scales"].T.float()
    g_idx = tensors["g_idx"].long()
    return (q - zp[:, g_idx]) * scales[:, g_idx]


def gptq_state(state: dict[str, torch.Tensor], quant: dict[str, Any], *, tied: bool) -> dict[str, torch.Tensor]:
    """The state in vLLM's GPTQ layout. vLLM's GPTQ has no INT8 head (``lm_head: false``): an INT8 head is
    dropped when it is the tied embedding's copy (vLLM ties it again) and written back dense otherwise."""
    if quant.get("bits") != 4 or not quant.get("sym"):
        raise QuantizeError(
            f"export vllm: vLLM 0.32 loads 4-bit symmetric GPTQ only; this state is {quant['method']} "
            f"{quant.get('bits')}-bit{'' if quant.get('sym') else ' asymmetric'} "
            "(quantize with method int4 or gptq and sym: true, or export before quantizing)"
        )
    out = {}
    for key, value in state.items():
        base = key.removesuffix(".qweight")
        if key in INT8_HEAD:
            continue
        if key.endswith(".qweight"):
            layout = to_gptq(value, state[f"{base}.scales"], state[f"{base}.zeros"])
            out |= {f"{base}.{name}": tensor for name, tensor in layout.items()}
        elif not key.endswith((".scales", ".zeros")):
            out[key] = value
    if "lm_head.qweight" in state and not tied:
        dtype = state["model.embed_tokens.weight"].dtype
        out["lm_head.weight"] = dequantize_int8(*(state[key] for key in INT8_HEAD)).to(dtype)
    return out


def gptq_config(quant: dict[str, Any]) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": quant["group_size"],
        "sym": True,
        "desc_act": False,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "damp_percent": quant.get("damp", 0.01),
        "true_sequential": quant["method"] == "gptq",
    }


def export(step: ExportStep, staging: Path, model_dir: Path, state: dict, quant: dict | None, recipe: Recipe) -> dict:
    """Write one engine's folder under ``staging/<format>``; returns what the manifest records."""
    check_export(step, quant)
    out = staging / step.format
    if step.format == "native":
        write_model(out, model_dir, state, {"quantization_config": quant} if quant else None)
        return {"path": step.format, "load_with": f"bentos/*.yaml: model: {recipe.out / step.format}"}
    if step.format == "vllm":
        if quant is None:
            write_model(out, model_dir, state)
        else:
            config = gptq_config(quant)
            tied = ModelShape.from_dir(model_dir).tie_word_embeddings
            write_model(out, model_dir, gptq_state(state, quant, tied=tied), {"quantization_config": config})
            (out / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return {"path": step.format, "load_with": f"vllm serve {recipe.out / step.format}"}
    write_model(out, model_dir, state)
    ckpt = recipe.out / "trtllm-checkpoint"
    commands = [
        f"python convert_checkpoint.py --model_dir {recipe.out / step.format} --output_dir {ckpt} --dtype bfloat16",
        f"trtllm-build --checkpoint_dir {ckpt} --output_dir {recipe.out / 'trtllm-engine'} --gemm_plugin auto",
    ]
    script = "\n".join(commands)
    (out / "BUILD.md").write_text(f"# TensorRT-LLM build\n\n{TRTLLM_NOTE}\n\n```bash\n{script}\n```\n")
    return {"path": step.format, "built": False, "note": TRTLLM_NOTE, "commands": commands}


def check_export(step: ExportStep, quant: dict[str, Any] | None) -> None:
    """Refuse an export the state cannot take, before any heavy work (the runner calls it in preflight)."""
    if quant is None:
        return
    if step.format == "vllm":
        gptq_state({}, quant, tied=True)  # refuses what vLLM cannot load before looking at any tensor
    elif step.format == "tensorrt-llm":
        raise QuantizeError(
            f"export {step.format}: export the unquantized (or merged) model before the quantize step; "
            "TensorRT-LLM quantizes at build time"
        )

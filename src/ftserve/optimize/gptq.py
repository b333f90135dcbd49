"""GPTQ (Frantar et al., 2022): 4-bit weights chosen column by column to minimise the layer's output error.

For a linear layer with weight W [N, K] and calibration inputs X [n, K], GPTQ minimises
||X Wᵀ - X Ŵᵀ||² one input column at a time: after rounding column j, the rounding error is spread over
the columns not yet quantized, weighted by the inverse Hessian H⁻¹ of that objective (H = 2 XᵀX / n), so
later columns absorb what earlier ones lost. The updates run in blocks of 128 columns ("lazy batch"
updates), with H⁻¹ taken through its upper Cholesky factor for numerical stability. Groups of
``group_size`` columns get their own (scale, zero), computed when the group's first column is reached, from
the already-updated weights. The output uses the INT4 layout of ``ftserve.engine.qlinear``.

Hessians come from forward hooks on every decoder linear while the full-precision model reads the
calibration texts (one pass, not layer-sequential: each layer sees full-precision inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ftserve.engine.qlinear import pack_int4
from ftserve.optimize.quantize import TARGET, QuantizeError, Quantizer, check_group_size, int4_params, register

BLOCK = 128


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (q 0..15 int32 [N, K], scales [N, K/g], zeros [N, K/g]) with W ≈ (q - 8) * scale + zero."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that never fire: any value works, keep H invertible
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)  # dampening, as in the paper
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # new group: its grid from the weights as updated so far
                group = w1[:, i : i + group_size] if i + group_size <= i2 - i1 else w[:, col : col + group_size]
                s_g, z_g = int4_params(group, group_size)
                scales[:, col // group_size], zeros[:, col // group_size] = s_g[:, 0], z_g[:, 0]
            s, z = scales[:, col // group_size], zeros[:, col // group_size]
            q = torch.round((w1[:, i] - z) / s + 8).clamp(0, 15)
            q_all[:, col] = q.to(torch.int32)
            # Rounding error of this column, scaled by its inverse-Hessian pivot, is pushed onto the later
            # columns of the block (exact OBS update for the remaining weights).
            err = (w1[:, i] - ((q - 8) * s + z)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the block's accumulated update for everything after it
    return q_all, scales, zeros


@torch.inference_mode()
def collect_hessians(
    model_dir: Path, state: dict[str, torch.Tensor], texts: list[str], max_length: int = 256
) -> dict[str, torch.Tensor]:
    """2·XᵀX/n per decoder linear (keyed by its weight name), from one fp32 pass of the model in ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise QuantizeError(f"gptq: state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not TARGET.match(f"{name}.weight"):
            continue

        def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor, key: str = f"{name}.weight") -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    try:
        for text in tqdm(texts, desc="gptq calibration", unit="text"):
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {key: 2 * sums[key] / counts[key] for key in sums}


@register
class GPTQQuantizer(Quantizer):
    """GPTQ 4-bit, per group, calibrated on text from the adapter's training data."""

    name = "gptq"
    bits = 4
    needs_calibration: ClassVar[bool] = True

    def __init__(self, group_size: int | None = 64, damp: float = 0.01) -> None:
        super().__init__(group_size or 64)
        self.damp = damp

    def check(self, state: dict[str, torch.Tensor]) -> None:
        check_group_size((tuple(state[k].shape) for k in self.targets(state)), self.group_size or 64)

    def prepare(self, state: dict[str, torch.Tensor], calibration: Any = None) -> dict[str, Any]:
        if not calibration:
            raise QuantizeError("gptq needs calibration texts")
        model_dir, texts = calibration
        return {"hessians": collect_hessians(Path(model_dir), state, texts)}

    def quantize_weight(self, name: str, w: torch.Tensor, prepared: dict[str, Any]) -> dict[str, torch.Tensor]:
        q, scales, zeros = gptq_quantize(w, prepared["hessians"][name], self.group_size or 64, self.damp)
        return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "damp": self.damp, "calibration": "adapter training data"}

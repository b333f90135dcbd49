"""GPTQ (Frantar et al., 2022): 4-bit weights chosen column by column to minimise the layer's output error.

For a linear layer with weight W [N, K] and calibration inputs X [n, K], GPTQ minimises
||X Wᵀ - X Ŵᵀ||² one input column at a time: after rounding column j, the rounding error is spread over
the columns not yet quantized, weighted by the inverse Hessian H⁻¹ of that objective (H = 2 XᵀX / n), so
later columns absorb what earlier ones lost. The updates run in blocks of 128 columns ("lazy batch"
updates), with H⁻¹ taken through its upper Cholesky factor for numerical stability. Groups of
``group_size`` columns get their own (scale, zero), computed when the group's first column is reached, from
the already-updated weights. The output uses the INT4 layout of ``ftserve.engine.qlinear``.

Calibration is sequential, as in the paper's reference code: the decoder runs layer by layer on the
calibration tokens (a plain fp32 Llama forward), and every projection is quantized from the inputs it sees
*after* the projections before it were quantized, so each layer corrects the error of those before it.
Projections that read the same input (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ftserve.engine.model import ModelShape, apply_rope, rms_norm, rope_tables
from ftserve.engine.qlinear import pack_int4
from ftserve.optimize.quantize import QuantizeError, Quantizer, check_group_size, int4_params, register

BLOCK = 128

# (input the projections read, the projections) in the order the decoder layer uses them.
PROJECTIONS = (
    ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attn_out", ("self_attn.o_proj",)),
    ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp_act", ("mlp.down_proj",)),
)

# Called with (layer, input name, inputs [n, K] of every calibration sequence); returns the weights to use
# from now on for the projections that read that input (keyed by their full weight name).
OnInputs = Callable[[int, str, list[torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GPTQSettings:
    group_size: int = 64
    sym: bool = False  # symmetric grid (zero point 8), what vLLM's GPTQ kernels take
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = False  # columns in order of decreasing Hessian diagonal, groups fixed up front
    clip_search: bool = False  # per-group range shrink that minimises rounding error (see int4_params)


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (q 0..15 int32 [N, K], scales [N, K/g], zeros [N, K/g]) with W ≈ (q - 8) * scale + zero.

    With ``act_order`` the columns with the largest Hessian diagonal (the inputs with the most energy) are
    quantized first, while the most columns are left to absorb their error; the groups' grids are then
    fixed from the weights before any update ("static groups"), so groups stay contiguous in the original
    column order and the checkpoint layout does not change.
    """
    g = settings.group_size
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that never fire: any value works, keep H invertible
    w[:, dead] = 0.0
    h += settings.damp * torch.mean(torch.diag(h)) * torch.eye(k)  # dampening, as in the paper
    scales = torch.zeros(n, k // g)
    zeros = torch.zeros(n, k // g)
    order = list(range(k))
    if settings.act_order:
        scales, zeros = int4_params(w, g, settings.sym, settings.clip_search)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, order = w[:, perm], h[perm][:, perm], perm.tolist()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros(n, k, dtype=torch.int32)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]  # the column in the original order
            if not settings.act_order and col % g == 0:  # new group: its grid from the weights updated so far
                group = w1[:, i : i + g] if i + g <= i2 - i1 else w[:, col : col + g]
                s_g, z_g = int4_params(group, g, settings.sym, settings.clip_search)
                scales[:, col // g], zeros[:, col // g] = s_g[:, 0], z_g[:, 0]
            s, z = scales[:, col // g], zeros[:, col // g]
            q = torch.round((w1[:, i] - z) / s + 8).clamp(0, 15)
            q_all[:, col] = q.to(torch.int32)
            # Rounding error of this column, scaled by its inverse-Hessian pivot, is pushed onto the later
            # columns of the block (exact OBS update for the remaining weights).
            err = (w1[:, i] - ((q - 8) * s + z)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the block's accumulated update for everything after it
    return q_all, scales, zeros


def hessian_of(inputs: list[torch.Tensor]) -> torch.Tensor:
    """2·XᵀX/n over every calibration token."""
    total = sum(x.T @ x for x in inputs)
    return 2 * total / sum(x.shape[0] for x in inputs)


@torch.inference_mode()
def run_decoder(
    shape: ModelShape, state: dict[str, torch.Tensor], seqs: list[list[int]], on_inputs: OnInputs | None = None
) -> list[torch.Tensor]:
    """The decoder in fp32, one layer at a time over all sequences; returns final-norm hidden states.

    ``on_inputs`` sees each projection's inputs before the projection runs and may replace its weights
    (GPTQ quantizes them there); the replaced weights are used for the rest of the pass.
    """
    rope = rope_tables(shape)
    hidden = [state["model.embed_tokens.weight"][torch.tensor(ids)].float() for ids in seqs]
    for layer in tqdm(range(shape.num_layers), desc="calibrate layers", unit="layer", leave=False):
        hidden = _decoder_layer(shape, state, layer, hidden, rope, on_inputs)
    final = state["model.norm.weight"].float()
    return [rms_norm(h, final, shape.rms_norm_eps) for h in hidden]


def _decoder_layer(
    shape: ModelShape,
    state: dict[str, torch.Tensor],
    layer: int,
    hidden: list[torch.Tensor],
    rope: tuple[torch.Tensor, torch.Tensor],
    on_inputs: OnInputs | None,
) -> list[torch.Tensor]:
    p = f"model.layers.{layer}."
    weights = {f"{p}{name}.weight": state[f"{p}{name}.weight"].float() for _, names in PROJECTIONS for name in names}

    def project(key: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if on_inputs is not None:
            weights.update(on_inputs(layer, key, xs))
        fused = torch.cat([weights[f"{p}{name}.weight"] for name in dict(PROJECTIONS)[key]])
        return [x @ fused.T for x in xs]

    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    groups = shape.num_heads // shape.num_kv_heads
    xs = [rms_norm(h, state[p + "input_layernorm.weight"].float(), shape.rms_norm_eps) for h in hidden]
    attn = []
    for qkv in project("attn_in", xs):
        t = qkv.shape[0]
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(t, shape.num_heads, shape.head_dim)
        k = k.view(t, shape.num_kv_heads, shape.head_dim)
        v = v.view(t, shape.num_kv_heads, shape.head_dim)
        cos, signed_sin = rope[0][:t, None], rope[1][:t, None]
        q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        attn.append(out.transpose(0, 1).reshape(t, q_size))
    hidden = [h + o for h, o in zip(hidden, project("attn_out", attn), strict=True)]
    xs = [rms_norm(h, state[p + "post_attention_layernorm.weight"].float(), shape.rms_norm_eps) for h in hidden]
    acts = [F.silu(g) * u for g, u in (gu.chunk(2, dim=-1) for gu in project("mlp_in", xs))]
    return [h + d for h, d in zip(hidden, project("mlp_act", acts), strict=True)]


def gptq_model(
    shape: ModelShape, state: dict[str, torch.Tensor], seqs: list[list[int]], settings: GPTQSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, scales, zeros) for every decoder projection, quantized sequentially (see the module docstring)."""
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    g = settings.group_size

    def quantize_inputs(layer: int, key: str, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        hessian = hessian_of(xs)
        replaced = {}
        for name in dict(PROJECTIONS)[key]:
            full = f"model.layers.{layer}.{name}.weight"
            q, scales, zeros = gptq_quantize(state[full], hessian, settings)
            results[full] = (q, scales, zeros)
            n, k = q.shape
            replaced[full] = ((q.float() - 8).view(n, -1, g) * scales[..., None] + zeros[..., None]).view(n, k)
        return replaced

    run_decoder(shape, state, seqs, quantize_inputs)
    return results


@register
class GPTQQuantizer(Quantizer):
    """GPTQ 4-bit, per group, calibrated sequentially on token sequences from the adapter's training data."""

    name = "gptq"
    bits = 4
    needs_calibration: ClassVar[bool] = True

    def __init__(
        self,
        group_size: int | None = 64,
        sym: bool = False,
        damp: float = 0.01,
        act_order: bool = False,
        clip_search: bool = False,
    ) -> None:
        super().__init__(group_size or 64, sym)
        self.settings = GPTQSettings(group_size or 64, sym, damp, act_order, clip_search)

    def check(self, state: dict[str, torch.Tensor]) -> None:
        check_group_size((tuple(state[k].shape) for k in self.targets(state)), self.group_size or 64)

    def prepare(self, state: dict[str, torch.Tensor], calibration: Any = None) -> dict[str, Any]:
        """``calibration`` is (ModelShape, token id sequences); the quantization itself happens here."""
        if not calibration or not calibration[1]:
            raise QuantizeError("gptq needs calibration sequences")
        shape, seqs = calibration
        return {"quantized": gptq_model(shape, state, seqs, self.settings)}

    def quantize_weight(self, name: str, w: torch.Tensor, prepared: dict[str, Any]) -> dict[str, torch.Tensor]:
        q, scales, zeros = prepared["quantized"][name]
        return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros}

    def config(self) -> dict[str, Any]:
        s = self.settings
        return {**super().config(), "damp": s.damp, "act_order": s.act_order, "clip_search": s.clip_search,
                "calibration": "sequential, adapter training data"}  # fmt: skip

"""A Llama-family decoder that runs packed, variable-length batches over a paged KV cache.

One forward computes every scheduled token of every sequence: projections and MLPs run once over all
packed tokens; attention reads each sequence's keys and values through its block table (engine/attention.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ftserve.engine.attention import AttentionPlan
from ftserve.engine.batch import ForwardBatch
from ftserve.engine.kernels import PagedAttention, RowsLinear, runs_on
from ftserve.engine.qlinear import LINEAR_KEYS, DenseLinear, Linear, QuantFormatError, build_linear

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class UnsupportedModelError(ValueError):
    """The model folder holds an architecture or setting the native engine does not implement."""


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelShape:
        """The shape of an HF model folder (its ``config.json``)."""
        return cls.from_config(json.loads((model_dir / "config.json").read_text()))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architectures {archs} not supported; native supports {SUPPORTED_ARCHITECTURES}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope_type {rope_type!r} not supported by the native engine")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedModelError("attention/MLP biases are not supported by the native engine")
        heads = int(cfg["num_attention_heads"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim  # times the element size


@dataclass
class Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # hidden → (heads + 2 * kv_heads) * head_dim: q, k and v projections fused
    o: Linear  # heads * head_dim → hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # hidden → 2 * intermediate: gate and up projections fused
    down: Linear  # intermediate → hidden


class KVCache:
    """Keys and values of every layer in flat slots (slot = block_id * block_size + offset).

    Layout [layer, kv_head, slot, head_dim]: gathering a row's blocks yields [kv_head, row, length, dim]
    directly in the order the attention matmuls want, so no copy to re-layout K or V is needed. With
    ``kernel`` (engine/kernels.py), attention of decode rows and short chunks reads the cache in place.
    """

    def __init__(
        self,
        shape: ModelShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kernel: PagedAttention | None = None,
    ):
        self.kernel = kernel if runs_on(device, dtype) else None
        slots = num_blocks * block_size
        size = (shape.num_layers, shape.num_kv_heads, slots, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (never pickle)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = fh.get_tensor(key)
    return state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 as in the reference implementation, then cast back.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_tables(shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [max_position, head_dim] (float32) of the default rotary embedding, for
    :func:`apply_rope`: the sin table's first half is negated."""
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
    freqs = torch.outer(torch.arange(shape.max_position, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    half = shape.head_dim // 2
    return emb.cos(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., head_dim]: x * cos + rotate_half(x) * sin, where rotate_half(x) * sin
    equals roll(x, half) * signed_sin (one roll instead of two slices, a negation and a cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class LoraApplier(Protocol):
    """Adds LoRA deltas to projection outputs in place (see ``engine/lora.py``)."""

    def apply(
        self, layer: int, targets: tuple[str, ...], x: torch.Tensor, fused: torch.Tensor, batch: ForwardBatch
    ) -> None: ...


class NativeLlama:
    """Weights in plain tensors; ``forward`` takes a :class:`ForwardBatch` and returns sampled-row logits."""

    def __init__(self, shape: ModelShape, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.device = device
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise UnsupportedModelError(f"weight {name!r} missing from the checkpoint")
            return weights[name].to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")

        def linear(*names: str) -> Linear:
            """Dense ``<name>.weight`` or quantized ``<name>.qweight`` / ``.scales`` [/ ``.zeros``], fused."""
            parts = []
            for name in names:
                found = {key: weights[f"{name}.{key}"] for key in LINEAR_KEYS if f"{name}.{key}" in weights}
                if not found:
                    raise UnsupportedModelError(f"weight {name!r} missing from the checkpoint")
                parts.append(found)
            try:
                return build_linear(parts, device, dtype)
            except QuantFormatError as exc:
                raise UnsupportedModelError(f"{names[0]}: {exc}") from exc

        # The head: the tied embedding, its own weight, or (a speculative draft's copy) quantized.
        if "lm_head.qweight" in weights:
            self.head = linear("lm_head")
        else:
            self.head = DenseLinear(self.embed if shape.tie_word_embeddings else w("lm_head.weight"))
        self.layers: list[Layer] = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                Layer(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=linear(*(p + f"self_attn.{n}_proj" for n in ("q", "k", "v"))),
                    o=linear(p + "self_attn.o_proj"),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=linear(p + "mlp.gate_proj", p + "mlp.up_proj"),
                    down=linear(p + "mlp.down_proj"),
                )
            )
        self.cos, self.signed_sin = (t.to(device=device, dtype=dtype) for t in rope_tables(shape))

    @classmethod
    def from_dir(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> NativeLlama:
        return cls(ModelShape.from_dir(model_dir), read_state(model_dir), device, dtype)

    def use_linear_kernel(self, kernel: RowsLinear | None) -> None:
        """Run the dense projections and the head through the row-invariant kernel (None: ``F.linear``)."""
        self.head.use_kernel(kernel)
        for layer in self.layers:
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                linear.use_kernel(kernel)

    def matmul_rows(self, rows: int) -> int:
        """The row count the layers' matmuls run ``rows`` token rows as: a forward's time follows it."""
        return self.layers[0].qkv.matmul_rows(rows) if self.layers else rows

    # -- forward ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: KVCache, lora: LoraApplier | None = None, num_layers: int | None = None
    ) -> torch.Tensor:
        """Logits [S, vocab] (float32) for the rows in ``batch.logits_indices``; writes new KV into ``cache``.

        ``num_layers`` runs only the first layers before the final norm and head (a layer-truncated draft).
        ``cache`` may hold another dtype than the activations (a bf16 draft reading a float32 target's KV):
        keys and values are stored, and attention computed, in the cache's dtype."""
        s = self.shape
        h = self.embed[batch.input_ids]
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        signed_sin = self.signed_sin[batch.positions].unsqueeze(1)
        group = s.num_heads // s.num_kv_heads
        plan = AttentionPlan(batch, cache.block_size, cache.num_blocks, self.device, group, cache.kernel)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i, layer in enumerate(self.layers[:num_layers]):
            x = rms_norm(h, layer.input_norm, s.rms_norm_eps)
            qkv = layer.qkv(x)
            if lora is not None:
                lora.apply(i, ("q_proj", "k_proj", "v_proj"), x, qkv, batch)
            qk, v = qkv.split((q_size + kv_size, kv_size), dim=-1)
            qk = qk.view(-1, s.num_heads + s.num_kv_heads, s.head_dim)
            qk = apply_rope(qk, cos, signed_sin)  # q and k in one pass
            q, k = qk.split((s.num_heads, s.num_kv_heads), dim=1)
            v = v.view(-1, s.num_kv_heads, s.head_dim)
            kv_dtype = cache.k.dtype
            cache.k[i].index_copy_(1, batch.slot_mapping, k.transpose(0, 1).to(kv_dtype))
            cache.v[i].index_copy_(1, batch.slot_mapping, v.transpose(0, 1).to(kv_dtype))
            attn = plan.attend(q.to(kv_dtype), cache.k[i], cache.v[i]).reshape(-1, q_size).to(h.dtype)
            out = layer.o(attn)
            if lora is not None:
                lora.apply(i, ("o_proj",), attn, out, batch)
            h = h + out
            x = rms_norm(h, layer.post_norm, s.rms_norm_eps)
            gate_up = layer.gate_up(x)
            if lora is not None:
                lora.apply(i, ("gate_proj", "up_proj"), x, gate_up, batch)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            out = layer.down(act)
            if lora is not None:
                lora.apply(i, ("down_proj",), act, out, batch)
            h = h + out
        last = rms_norm(h[batch.logits_indices], self.final_norm, s.rms_norm_eps)
        return self.head(last).float()

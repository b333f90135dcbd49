"""A draft model's plain drafting pass (one token row per sequence) in one compiled call.

An INT8 draft's layers run in ``draft_layers.cpp`` (see there for why): the embedding lookup, the final norm
and the head stay here. Used by :class:`~ftserve.engine.draft_model.DraftModel` for every pass whose pieces
are one token each; catch-up passes over many tokens keep the Python forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftserve.engine.batch import ForwardBatch
from ftserve.engine.kernels import DraftLayers, runs_on
from ftserve.engine.model import KVCache, NativeLlama, rope_tables
from ftserve.engine.qlinear import Int8Linear, Linear


class CompiledPass:
    """The draft's weights laid out for ``draft_layers`` (norms and scales as float32), and a pass through it."""

    def __init__(self, op: DraftLayers, model: NativeLlama, num_layers: int | None) -> None:
        self.op = op
        self.model = model
        # Per layer, the kernel's order: input norm, qkv, o, post norm, gate_up, down (each INT8 weight, scales).
        self.weights: list[torch.Tensor] = []
        for layer in model.layers[:num_layers]:
            for norm, pair in (
                (layer.input_norm, (layer.qkv, layer.o)),
                (layer.post_norm, (layer.gate_up, layer.down)),
            ):
                self.weights.append(norm.float().contiguous())
                for linear in _int8(list(pair)):
                    self.weights += [linear.qweight, linear.scales.float().contiguous()]
        self.final_norm = model.final_norm.float()
        self.cos, self.sin = rope_tables(model.shape)  # float32, not the model's bfloat16 copies
        head = model.head
        self.head_int8 = (head.qweight, head.scales.float().contiguous()) if isinstance(head, Int8Linear) else None

    @classmethod
    def build(cls, op: DraftLayers | None, model: NativeLlama, num_layers: int | None) -> CompiledPass | None:
        """The compiled pass of ``model`` (its first ``num_layers``), or None where it does not apply: no kernel,
        not on CPU, or a projection that is not INT8 (an INT4 or dense draft keeps the Python forward)."""
        if op is None or not runs_on(model.device, torch.float32):
            return None
        layers = model.layers[:num_layers]
        if not _int8([p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]):
            return None
        return cls(op, model, num_layers)

    @staticmethod
    def applies(batch: ForwardBatch, cache: KVCache) -> bool:
        """One token per piece, and a cache the kernel reads (CPU, float32 or bfloat16)."""
        return batch.decode_only and runs_on(cache.k.device, cache.k.dtype)

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [pieces, vocab] (float32) of a one-token-per-piece batch; writes its KV into ``cache``."""
        s = self.model.shape
        h = self.model.embed[batch.input_ids].float()
        h = self.op(
            h,
            self.weights,
            cache.k,
            cache.v,
            batch.slot_mapping,
            batch.positions,
            batch.block_tables,
            self.cos,
            self.sin,
            s.num_heads,
            s.num_kv_heads,
            cache.block_size,
            s.rms_norm_eps,
        )
        last = F.rms_norm(h[batch.logits_indices], (s.hidden_size,), eps=s.rms_norm_eps) * self.final_norm
        if self.head_int8 is not None:
            return torch.ops.ftserve.int8_linear(last.contiguous(), *self.head_int8)
        return self.model.head(last.to(self.model.dtype)).float()


def _int8(linears: list[Linear]) -> list[Int8Linear]:
    """``linears`` when every one is INT8, else []."""
    int8 = [p for p in linears if isinstance(p, Int8Linear)]
    return int8 if len(int8) == len(linears) else []

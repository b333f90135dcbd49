"""Quality measured on the engine that serves the artifact: full-sequence logits and perplexity.

Quantized checkpoints only load in the native engine, so the gate scores every variant (fp32, bf16,
merged, int8, int4, gptq) through :class:`NativeLlama`, one prefill per window with logits at every
position; an adapter can be applied unmerged (LoRA), as the service serves it.
"""

from __future__ import annotations

import math

import torch

from ftserve.engine.batch import ForwardBatch
from ftserve.engine.lora import LoraAdapter, LoraManager
from ftserve.engine.model import KVCache, NativeLlama

BLOCK = 16


def lora_for(model: NativeLlama, adapter: LoraAdapter) -> LoraManager:
    """A one-slot LoRA manager holding ``adapter``, for scoring the model with it applied unmerged."""
    manager = LoraManager(model.shape, 1, adapter.rank, model.device, model.dtype)
    manager.register(adapter)
    manager.acquire({adapter.name})
    return manager


@torch.inference_mode()
def sequence_logits(model: NativeLlama, ids: list[int], lora: LoraManager | None = None) -> torch.Tensor:
    """Logits [T, vocab] (float32) of one sequence prefilled in a single forward (with the adapter that
    ``lora`` holds in its one slot, if given)."""
    n = len(ids)
    blocks = -(-n // BLOCK)
    device = model.device
    cache = KVCache(model.shape, blocks, BLOCK, model.dtype, device)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.arange(n, device=device),
        slot_mapping=torch.arange(n, device=device),
        query_lens=[n],
        context_lens=[n],
        block_tables=torch.arange(blocks, device=device).unsqueeze(0),
        logits_indices=torch.arange(n, device=device),
    )
    if lora is None:
        return model.forward(batch, cache)
    names = set(lora.registered)
    slots = lora.acquire(names)
    batch.lora = lora.batch(torch.full((n,), slots[next(iter(names))], device=device), names)
    return model.forward(batch, cache, lora)


def perplexity(model: NativeLlama, ids: list[int], window: int = 256, lora: LoraManager | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = sequence_logits(model, chunk, lora)[:-1]
        targets = torch.tensor(chunk[1:], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / max(1, count))

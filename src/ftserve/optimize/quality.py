"""Quality measured on the engine that serves the artifact: full-sequence logits and perplexity.

Quantized checkpoints only load in the native engine, so the gate scores every variant (fp32, bf16,
merged, int8, int4, gptq) through :class:`NativeLlama`, one prefill per window with logits at every
position.
"""

from __future__ import annotations

import math

import torch

from ftserve.engine.batch import ForwardBatch
from ftserve.engine.model import KVCache, NativeLlama

BLOCK = 16


@torch.inference_mode()
def sequence_logits(model: NativeLlama, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] (float32) of one sequence prefilled in a single forward."""
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
    return model.forward(batch, cache)


def perplexity(model: NativeLlama, ids: list[int], window: int = 256) -> float:
    """exp(mean next-token NLL) over non-overlapping windows."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = sequence_logits(model, chunk)[:-1]
        targets = torch.tensor(chunk[1:], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / max(1, count))

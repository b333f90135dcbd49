"""Token selection: greedy, temperature, top-k and top-p, with a per-request seeded generator."""

from __future__ import annotations

import torch

from ftserve.engine.request import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator per seeded request, so its draws do not depend on other requests."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the smallest set whose mass reaches top_p.

    ``logits`` is [vocab], already divided by the temperature. The most likely token always survives.
    """
    out = logits.clone()
    if top_k is not None and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass *before* it already reaches top_p: keeps the token that crosses it.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        drop[0] = False
        out[order[drop]] = float("-inf")
    return out


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits ([vocab], any float dtype)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scaled = logits.float().cpu() / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())

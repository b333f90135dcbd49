"""Speculative decoding: drafters propose the next tokens, one target forward verifies them.

A decoding sequence normally computes one token a step. With speculation its chunk carries the pending
token plus ``k`` drafted ones; the target model scores all ``k + 1`` positions in the same batched forward
(other rows of the batch are unaffected), and :func:`verify` keeps the longest prefix the target agrees
with, plus one token of its own. KV written for rejected drafts is simply not counted as computed (the
next step overwrites it) and blocks beyond what the sequence needs are given back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ftserve.engine.request import SamplingParams
from ftserve.engine.sampler import filter_logits, sample_token


class PromptLookup:
    """Drafts by n-gram match (Saxena's prompt lookup decoding): find the most recent earlier occurrence of
    the last ``n`` tokens (prompt and generated text alike, longest ``n`` first) and propose what followed
    it. Free to compute, and strong when the output copies from the input (extraction, editing, code)."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        total = len(tokens)
        for n in range(min(self.ngram_max, total - 1), self.ngram_min - 1, -1):
            tail = list(tokens[total - n :])
            for start in range(total - n - 1, -1, -1):  # most recent match first, never the tail itself
                if list(tokens[start : start + n]) == tail:
                    follow = list(tokens[start + n : start + n + k])
                    if follow:
                        return follow
        return []


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]  # accepted drafts, then the target's own next token
    accepted: int  # how many of the drafts were kept


def verify(
    logits: torch.Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    """Check ``draft`` against the target's ``logits`` rows ([len(draft) + 1, vocab]): row ``i`` predicts the
    token after draft ``i - 1``.

    Greedy: keep drafts while they equal the target's argmax, then emit the argmax where they first differ
    (or after the last draft): exactly the tokens plain decoding would give.

    Sampled: the rule of Leviathan et al. / Chen et al. with a deterministic proposal (the drafter puts all
    its mass q on its token d): accept d with probability min(1, p(d) / q(d)) = p(d); on rejection sample from
    the residual max(0, p - q) renormalised, which is p with d removed. Every emitted token is then
    distributed exactly as the target's p, the same filtered distribution plain sampling uses.
    """
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(draft) and draft[kept] == best[kept]:
            kept += 1
        return Verdict([*draft[:kept], best[kept]], kept)
    out: list[int] = []
    for i, token in enumerate(draft):
        probs = target_probs(logits[i], params)
        u = torch.rand((), generator=generator).item()
        if u < probs[token].item():
            out.append(token)
            continue
        residual = probs.clone()
        residual[token] = 0.0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator).item()))
        return Verdict(out, i)
    out.append(sample_token(logits[len(draft)], params, generator))
    return Verdict(out, len(draft))


def target_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, then top-k / top-p."""
    scaled = row.float().cpu() / params.temperature
    return torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)


class AdaptiveK:
    """How many tokens to draft for one sequence: the configured ``k`` while drafts are accepted, shrinking
    when they are not, and off (0) after a run of fully rejected steps, retried every ``retry_every`` steps,
    so a drafter that does not fit the text costs little."""

    def __init__(self, k: int, retry_every: int = 16) -> None:
        self.k_max = k
        self.k = k
        self.retry_every = retry_every
        self._misses = 0
        self._idle = 0

    def next_k(self) -> int:
        if self.k > 0:
            return self.k
        self._idle += 1
        if self._idle >= self.retry_every:  # try again: the text may have become repetitive
            self._idle, self.k = 0, 1
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
            self._misses = 0
        elif accepted == 0:
            self._misses += 1
            self.k = 0 if self._misses >= 2 else max(1, self.k // 2)
        else:
            self.k = max(1, accepted)
            self._misses = 0

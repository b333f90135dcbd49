"""Speculative decoding: drafters propose the next tokens, one target forward verifies them.

A decoding sequence normally computes one token a step. With speculation its chunk carries the pending
token plus ``k`` drafted ones; the target model scores all ``k + 1`` positions in the same batched forward
(other rows of the batch are unaffected), and :func:`verify` keeps the longest prefix the target agrees
with, plus one token of its own. KV written for rejected drafts is simply not counted as computed (the
next step overwrites it) and blocks beyond what the sequence needs are given back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ftserve.engine.request import SamplingParams
from ftserve.engine.sampler import filter_logits, sample_token


class PromptLookup:
    """Drafts by n-gram match (Saxena's prompt lookup decoding): find the most recent earlier occurrence of
    the last ``n`` tokens (prompt and generated text alike) and propose what followed it. Free to compute,
    and strong when the output copies from the input (extraction, editing, code).

    The longest match wins, whichever source it is in: for each ``n`` from ``ngram_max`` down to ``ngram_min``
    the request's own text is searched first, then ``history`` (a 4-gram of an adapter's earlier outputs is a
    better guess than a 2-gram of the prompt). Below ``ngram_min``, one last token still matches if it
    occurs exactly once earlier in the request's own text (``anchors``): a rare token such as a piece of an
    order number has one continuation, while a frequent one (``the``, a comma) is a poor guess. On the
    grounded bench prompts this drafted the value that follows a JSON key after its first token (``PX`` →
    ``-2290``), which no 2-gram of the prompt matched."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1, anchors: bool = True) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.anchors = anchors

    def propose(self, tokens: Sequence[int], k: int, history: OutputHistory | None = None) -> list[int]:
        """Up to ``k`` tokens: from the longest match in the sequence's own text or in ``history``."""
        total = len(tokens)
        for n in range(min(self.ngram_max, total - 1), self.ngram_min - 1, -1):
            follow = self._match(tokens, n, k)
            if not follow and history is not None:
                follow = history.propose(tokens, k, n)
            if follow:
                return follow
        if self.anchors and self.ngram_min > 1 and total > 1 and tokens.count(tokens[-1]) == 2:  # once before the last
            return self._match(tokens, 1, k)
        return []

    @staticmethod
    def _match(tokens: Sequence[int], n: int, k: int) -> list[int]:
        """What followed the most recent earlier occurrence of the last ``n`` tokens (never the tail itself)."""
        total = len(tokens)
        tail = list(tokens[total - n :])
        for start in range(total - n - 1, -1, -1):
            if list(tokens[start : start + n]) == tail:
                follow = list(tokens[start + n : start + n + k])
                if follow:
                    return follow
        return []


class OutputHistory:
    """Recent outputs of one adapter, indexed by n-gram, for prompt lookup to draft from when the request's
    own text has no match (the idea of suffix decoding, Oliaro et al. 2024). A fine-tuned adapter repeats
    its output template from request to request (order-extract's ``{"sku": "``, ``", "quantity": ``...),
    text no prompt contains. Each output is indexed with the last prompt tokens before it, so its first
    tokens can be drafted too. Bounded: the oldest n-grams go first."""

    def __init__(self, ngram_max: int, ngram_min: int, max_ngrams: int = 50_000) -> None:
        self.ngrams = range(ngram_min, ngram_max + 1)
        self.max_ngrams = max_ngrams
        self._next: OrderedDict[tuple[int, ...], tuple[list[int], int]] = OrderedDict()

    def add(self, context: Sequence[int], output: Sequence[int]) -> None:
        tokens = [*context[-self.ngrams.stop + 1 :], *output]
        for n in self.ngrams:
            for end in range(n, len(tokens)):
                key = tuple(tokens[end - n : end])
                self._next[key] = (tokens, end)  # the latest occurrence wins
                self._next.move_to_end(key)
        while len(self._next) > self.max_ngrams:
            self._next.popitem(last=False)

    def __len__(self) -> int:
        return len(self._next)

    def propose(self, tokens: Sequence[int], k: int, n: int | None = None) -> list[int]:
        """What followed the longest n-gram of ``tokens``' tail (only the last ``n`` tokens, if given) in the
        latest output that had it; ``[]`` when none did."""
        for size in reversed(self.ngrams) if n is None else (n,):
            if size in self.ngrams and size <= len(tokens):
                hit = self._next.get(tuple(tokens[len(tokens) - size :]))
                if hit is not None:
                    source, end = hit
                    return source[end : end + k]
        return []


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]  # accepted drafts, then the target's own next token
    accepted: int  # how many of the drafts were kept


def verify(
    logits: torch.Tensor,
    draft: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    argmax: list[int] | None = None,
) -> Verdict:
    """Check ``draft`` against the target's ``logits`` rows ([len(draft) + 1, vocab]): row ``i`` predicts the
    token after draft ``i - 1``. ``argmax``: those rows' argmax, when the caller has it already.

    Greedy: keep drafts while they equal the target's argmax, then emit the argmax where they first differ
    (or after the last draft): exactly the tokens plain decoding would give.

    Sampled: the rule of Leviathan et al. / Chen et al. with a deterministic proposal (the drafter puts all
    its mass q on its token d): accept d with probability min(1, p(d) / q(d)) = p(d); on rejection sample from
    the residual max(0, p - q) renormalised, which is p with d removed. Every emitted token is then
    distributed exactly as the target's p, the same filtered distribution plain sampling uses.
    """
    if params.greedy:
        best = logits.argmax(dim=-1).tolist() if argmax is None else argmax
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


class AcceptanceRate:
    """How often one sequence's drafted tokens are accepted: per drafted token, given that the one before it
    was (what :func:`spec_cost.choose_drafts` weighs drafts by).

    Drafts are accepted up to the first rejection, so with a per-token rate ``a`` the number accepted
    before a rejection is geometric, and accepted tokens over accepted tokens plus rejections estimates
    ``a``. Both counts decay exponentially, so the estimate follows the text as it changes; a prior worth
    about two steps stands until then.
    """

    def __init__(self, prior: float = 0.7, decay: float = 0.8) -> None:
        self.decay = decay
        self._accepted = prior * 2
        self._rejected = (1 - prior) * 2

    @property
    def rate(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self._accepted = self.decay * self._accepted + accepted
        self._rejected = self.decay * self._rejected + (1 if accepted < drafted else 0)

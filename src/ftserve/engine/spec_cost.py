"""Which drafts pay in one step: what the target's forward costs against its rows, and a choice, over the
whole batch, of how many tokens each decoding sequence drafts.

A drafted token costs one more row in the target's forward (and, for a draft model, a share of a draft
pass); it pays only if the tokens it is expected to add outweigh that. How much one more row costs depends
on the batch: next to the weights a small batch streams anyway a row is cheap, in a compute-bound batch it
is not, and on CPUs a forward's time moves in steps of the matmuls' padded row count (MKL computes rows in
panels of 8, see ``qlinear.dense_linear``), so a drafted token that fits in padding is nearly free while one
that opens a new panel must bring enough accepted tokens to pay for the whole panel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

PRIOR_ROW_COST = 0.06  # one more matmul row as a fraction of a one-row step, until steps are timed (CPU,
# SmolLM2-135M at 300 tokens of context: a step of 16 rows takes 1.37x one of 8)
PRIOR_STEP_S = 0.05  # a decode step's time before any was timed; only ratios matter until then


def unpadded(rows: int) -> int:
    """``matmul_rows`` of a model whose matmuls run the token rows as they are."""
    return rows


class StepTime:
    """Forward seconds against the row count its matmuls run (``matmul_rows`` of the token rows):
    ``seconds ≈ fixed + per_row * matmul_rows(rows)``, by exponentially weighted least squares over recent
    decode steps. Until the steps seen vary in rows, the prior's shape scaled to their mean time."""

    def __init__(self, matmul_rows: Callable[[int], int] = unpadded, decay: float = 0.98) -> None:
        self.matmul_rows = matmul_rows
        self.decay = decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, rows: int, seconds: float) -> None:
        d, x = self.decay, self.matmul_rows(rows)
        self._n, self._x, self._y = d * self._n + 1, d * self._x + x, d * self._y + seconds
        self._xx, self._xy = d * self._xx + x * x, d * self._xy + x * seconds

    @property
    def timed(self) -> bool:
        return self._n > 0

    def seconds(self, rows: int) -> float:
        """Expected forward time of a decode step of ``rows`` token rows."""
        x, n = self.matmul_rows(rows), self._n
        spread = n * self._xx - self._x**2
        if n >= 4 and spread > 1e-9 * max(1.0, n * self._xx):
            per_row = max(0.0, (n * self._xy - self._x * self._y) / spread)
            fixed = max(1e-6, (self._y - per_row * self._x) / n)
            return fixed + per_row * x
        if n == 0:
            return PRIOR_STEP_S * _prior(x)
        return self._y / n * _prior(x) / _prior(self._x / n)


def _prior(rows: float) -> float:
    return 1 + PRIOR_ROW_COST * (rows - 1)


@dataclass(frozen=True)
class Candidate:
    """A decoding sequence that may draft this step."""

    seq_id: int
    acceptance: float  # chance that a drafted token is accepted, given that the one before it was
    most: int  # tokens it may draft at most (its k, or what prompt lookup found)
    by_model: bool  # drafted by the draft model: each drafted position is one more (batched) draft pass


def choose_drafts(
    candidates: list[Candidate], decoding: int, step_s: Callable[[int], float], pass_s: float
) -> dict[int, int]:
    """Tokens to draft per sequence id, so that the step yields the most tokens per second.

    Drafts are accepted up to the first rejection, so the ``j``-th drafted token of a sequence whose drafts
    are accepted at rate ``a`` adds ``a**j`` tokens on average. For each number of draft-model passes ``p``
    (the draft model drafts one position per batched pass, ``pass_s`` each; its sequences then draft at most
    ``p`` tokens), the drafted tokens are taken in order of that gain (a sequence's own in order, since
    ``a**j`` falls with ``j``): a step carrying the first ``r`` of them yields ``decoding`` plus their gains
    in ``step_s(decoding + r) + p * pass_s`` seconds. The best ``p`` and ``r`` win; no drafts (plain
    decoding) when none pay, so a drafter that does not fit the text costs little.
    """
    most_passes = max((c.most for c in candidates if c.by_model), default=0)
    rankings = [_ranked(candidates, passes) for passes in range(most_passes + 1)]
    step = [step_s(decoding + r) for r in range(max(map(len, rankings)) + 1)]  # by drafted rows, fitted once
    best_passes, best_r = 0, 0
    best_rate = decoding / step[0]
    for passes, ranked in enumerate(rankings):
        expected = float(decoding)
        for r, (gain, _) in enumerate(ranked, start=1):
            expected += gain
            rate = expected / (step[r] + passes * pass_s)
            if rate > best_rate:
                best_passes, best_r, best_rate = passes, r, rate
    return dict(Counter(c.seq_id for _, c in rankings[best_passes][:best_r]))


def _ranked(candidates: list[Candidate], passes: int) -> list[tuple[float, Candidate]]:
    """Every token the candidates may draft with ``passes`` draft-model passes, by expected gain."""
    tokens = [
        (c.acceptance**j, j, c)
        for c in candidates
        for j in range(1, (min(c.most, passes) if c.by_model else c.most) + 1)
    ]
    tokens.sort(key=lambda t: (-t[0], t[1]))
    return [(gain, c) for gain, _, c in tokens]

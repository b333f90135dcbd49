"""Speculative decoding in the native engine: which drafter and how many tokens per request, drafting for
a batch, and what verification leaves behind (adaptive k, acceptance counts, output history).

The scheduler asks :meth:`Speculator.draft_len` per decoding sequence, reserves the blocks, then calls
:meth:`Speculator.propose` once for the whole batch; the engine verifies with :func:`speculative.verify`
and reports back through :meth:`Speculator.verified`, and :meth:`Speculator.finished` when a request ends.
"""

from __future__ import annotations

import logging

from ftserve.config import Drafter, SpeculativeConfig
from ftserve.engine.draft_model import DraftModel
from ftserve.engine.scheduler import Sequence
from ftserve.engine.speculative import VERIFY_COST_PER_TOKEN, AdaptiveK, OutputHistory, PromptLookup

log = logging.getLogger(__name__)

COST_DECAY = 0.9  # weight of the past in the running estimate of the draft model's cost


class StepTime:
    """Forward time against packed rows, ``seconds ≈ fixed + rows * per_row``, by exponentially weighted least
    squares over recent steps (decode steps vary in rows with batch size and drafts)."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._n, self._x, self._y = d * self._n + 1, d * self._x + rows, d * self._y + seconds
        self._xx, self._xy = d * self._xx + rows * rows, d * self._xy + rows * seconds

    def row_share(self, batch: int) -> float:
        """One more row as a fraction of one sequence's share (1 / ``batch``) of a ``batch``-row step."""
        spread = self._n * self._xx - self._x**2
        if self._n < 4 or spread <= 1e-9 * max(1.0, self._n * self._xx):
            return VERIFY_COST_PER_TOKEN * batch  # not enough variety in rows yet: the CPU prior
        per_row = max(0.0, (self._n * self._xy - self._x * self._y) / spread)
        fixed = max(1e-6, (self._y - per_row * self._x) / self._n)
        return batch * per_row / (fixed + batch * per_row)


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft: DraftModel | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.lookup = PromptLookup(config.ngram_max, config.ngram_min)
        self.draft = draft
        # One draft-model pass (batched over the step's drafting sequences) as a fraction of the target's
        # forward in the same step; measured as it runs, so k follows what drafting really costs here.
        self.draft_cost = 0.5
        self._draft_s: float | None = None  # time one draft pass took this step, until the forward is timed
        self.histories: dict[str | None, OutputHistory] = {}  # by adapter namespace (None: the base model)
        self.step_time = StepTime()
        self._row_cost = VERIFY_COST_PER_TOKEN  # one more verified row this step (see token_cost)

    def begin_step(self, decoding: int) -> None:
        """What one more verified row costs a sequence in a step of ``decoding`` rows: a row is cheap next to
        the weights a small batch reads anyway, and dear once the batch is large enough to be compute-bound."""
        self._row_cost = self.step_time.row_share(max(1, decoding))

    @property
    def available(self) -> tuple[Drafter, ...]:
        """Drafters a request may ask for (prompt lookup needs nothing loaded)."""
        return ("none", "prompt-lookup", "draft-model") if self.draft is not None else ("none", "prompt-lookup")

    def drafter_of(self, seq: Sequence) -> Drafter:
        """The request's drafter, else the deployment's; one that is not loaded means none."""
        params, asked = seq.request.params, seq.request.speculation
        if not params.greedy and params.seed is not None:
            # A seeded sampled request must be reproducible; which drafts are tried (and so how the seeded
            # generator is consumed) depends on adaptive state and other requests' outputs.
            return "none"
        name = asked.drafter if asked is not None and asked.drafter is not None else self.config.drafter
        return name if name in self.available else "none"

    def draft_len(self, seq: Sequence, limit: int) -> int:
        """Tokens to draft for ``seq`` now: its k (adaptive) capped by ``limit``, max_tokens and the context."""
        drafter = self.drafter_of(seq)
        if drafter == "none":
            return 0
        asked = seq.request.speculation
        k = asked.num_tokens if asked is not None and asked.num_tokens is not None else self.config.num_tokens
        if self.config.adaptive:
            if seq.adaptive is None:
                seq.adaptive = AdaptiveK(k)
            k = seq.adaptive.next_k(self.token_cost(drafter))
        room = seq.request.params.max_tokens - len(seq.generated) - 1
        return max(0, min(k, limit, room, self.max_model_len - len(seq.token_ids)))

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        by_model = []
        for seq, k in wants:
            seq.draft = []
            drafter = self.drafter_of(seq)
            if drafter == "prompt-lookup":
                seq.draft = self.lookup.propose(seq.token_ids, k, self._history(seq))
            elif drafter == "draft-model":
                by_model.append((seq, k))
        if by_model and self.draft is not None:
            try:
                drafts = self.draft.propose(by_model)
            except Exception:  # a failing draft costs the speedup, never the requests
                log.exception("draft model %s failed; speculation by draft model is now off", self.draft.name)
                self.draft = None
                return
            passes = self.draft.pass_s
            self._draft_s = sum(passes) / len(passes) if passes else None
            for (seq, _), draft in zip(by_model, drafts, strict=True):
                seq.draft = draft

    def forward_took(self, seconds: float, rows: int | None) -> None:
        """The target's forward of this step: turns the step's draft time into a relative cost and, for a
        decode step (``rows`` packed tokens; None for a step with prefill), refines what one more row costs."""
        if self._draft_s is not None and seconds > 0:
            self.draft_cost = COST_DECAY * self.draft_cost + (1 - COST_DECAY) * self._draft_s / seconds
        self._draft_s = None
        if rows is not None:
            self.step_time.add(rows, seconds)

    def token_cost(self, drafter: Drafter) -> float:
        """What drafting one more token costs a sequence this step, as a fraction of its share of a plain step:
        drafting it (a draft model) plus verifying it (one more row, see :meth:`begin_step`)."""
        return self._row_cost + (self.draft_cost if drafter == "draft-model" else 0.0)

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.num_drafts += 1
        seq.num_draft_tokens += drafted
        seq.num_accepted_tokens += accepted
        if seq.adaptive is not None:
            seq.adaptive.update(drafted, accepted)

    def finished(self, seq: Sequence) -> None:
        """A request ended: drop its draft KV; if it drafted by prompt lookup, remember its output for that."""
        if self.draft is not None:
            self.draft.forget(seq.seq_id)
        history = self._history(seq) if self.drafter_of(seq) == "prompt-lookup" else None
        if history is not None and seq.generated and not seq.aborted:
            history.add(seq.request.prompt_token_ids, seq.generated)

    def forget(self, seq_id: int) -> None:
        """The sequence lost its blocks (preemption): its draft KV is gone."""
        if self.draft is not None:
            self.draft.forget(seq_id)

    def clear_history(self) -> None:
        self.histories.clear()

    def _history(self, seq: Sequence) -> OutputHistory | None:
        if not self.config.ngram_history:
            return None
        name = seq.namespace  # the adapter and its version: a new version may write differently
        if name not in self.histories:
            self.histories[name] = OutputHistory(self.config.ngram_max, self.config.ngram_min)
        return self.histories[name]

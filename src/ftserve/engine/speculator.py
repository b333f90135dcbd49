"""Speculative decoding in the native engine: which drafter and how many tokens per request, drafting for
a batch, and what verification leaves behind (acceptance rates, counts, output history).

The scheduler calls :meth:`Speculator.begin_step` with the step's decoding sequences, which chooses the
drafts for the whole batch (``spec_cost.choose_drafts``); it asks :meth:`Speculator.draft_len` per sequence,
reserves the blocks, then calls :meth:`Speculator.propose` once for the whole batch; the engine verifies with
:func:`speculative.verify` and reports back through :meth:`Speculator.verified`, and
:meth:`Speculator.finished` when a request ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ftserve.config import Drafter, SpeculativeConfig
from ftserve.engine.draft_model import DraftModel
from ftserve.engine.scheduler import Sequence
from ftserve.engine.spec_cost import Candidate, StepTime, choose_drafts, unpadded
from ftserve.engine.speculative import AcceptanceRate, OutputHistory, PromptLookup

log = logging.getLogger(__name__)

RECENT_DECAY = 0.98  # weight of the past in the acceptance across requests (about the last 50 drafts)
PRIOR_PASS_SHARE = 0.5  # a draft pass as a fraction of the target's step, until a pass is timed


class Speculator:
    def __init__(
        self,
        config: SpeculativeConfig,
        max_model_len: int,
        draft: DraftModel | None = None,
        matmul_rows: Callable[[int], int] = unpadded,
    ) -> None:
        """``matmul_rows``: the row count the target's matmuls run a step's token rows as (its time follows)."""
        self.config = config
        self.max_model_len = max_model_len
        self.lookup = PromptLookup(config.ngram_max, config.ngram_min)
        self.draft = draft
        # One batched draft-model pass against the sequences in it, measured as it runs: a pass of 8 costs
        # more than one of 1, and more so in the draft's INT8 kernels than in the target's fp32 matmuls.
        self.pass_time = StepTime(draft.model.matmul_rows) if draft is not None else StepTime()
        self.histories: dict[str | None, OutputHistory] = {}  # by adapter namespace (None: the base model)
        self.step_time = StepTime(matmul_rows)
        # Acceptance across requests, per drafter and adapter: a new request's estimate starts from it (a
        # drafter that does not fit this traffic is not tried again at full cost by every request that arrives).
        self.recent: dict[tuple[Drafter, str | None], AcceptanceRate] = {}
        self._planned: dict[int, int] = {}  # seq id → tokens to draft this step
        self._lookups: dict[int, list[int]] = {}  # seq id → what prompt lookup found this step

    def begin_step(self, decoding: list[Sequence]) -> None:
        """Choose this step's drafts: each sequence's k (from the request or the deployment), or with
        ``adaptive`` the drafts that make the whole step yield the most tokens per second."""
        self._planned.clear()
        self._lookups.clear()
        candidates = []
        for seq in decoding:
            drafter = self.drafter_of(seq)
            if drafter == "none":
                continue
            asked = seq.request.speculation
            k = asked.num_tokens if asked is not None and asked.num_tokens is not None else self.config.num_tokens
            room = seq.request.params.max_tokens - len(seq.generated) - 1
            k = max(0, min(k, room, self.max_model_len - len(seq.token_ids)))
            if drafter == "prompt-lookup" and k:  # free to compute: count only what it finds
                self._lookups[seq.seq_id] = self.lookup.propose(seq.token_ids, k, self._history(seq))
                k = len(self._lookups[seq.seq_id])
            if not k:
                continue
            if not self.config.adaptive:
                self._planned[seq.seq_id] = k
                continue
            if seq.acceptance is None:
                recent = self.recent.get((drafter, seq.request.adapter))
                seq.acceptance = AcceptanceRate() if recent is None else AcceptanceRate(prior=recent.rate)
            candidates.append(Candidate(seq.seq_id, seq.acceptance.rate, k, drafter == "draft-model"))
        if candidates:
            steps = self.step_time.seconds
            drafting = sum(c.by_model for c in candidates)
            timed = self.pass_time.timed
            pass_s = self.pass_time.seconds(drafting) if timed else PRIOR_PASS_SHARE * steps(len(decoding))
            self._planned.update(choose_drafts(candidates, len(decoding), steps, pass_s))

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
        """Tokens to draft for ``seq`` in this step, at most ``limit`` (what :meth:`begin_step` chose)."""
        return max(0, min(self._planned.get(seq.seq_id, 0), limit))

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        by_model = []
        for seq, k in wants:
            seq.draft = []
            drafter = self.drafter_of(seq)
            if drafter == "prompt-lookup":
                seq.draft = self._lookups.get(seq.seq_id, [])[:k]
            elif drafter == "draft-model":
                by_model.append((seq, k))
        if by_model and self.draft is not None:
            try:
                drafts = self.draft.propose(by_model)
            except Exception:  # a failing draft costs the speedup, never the requests
                log.exception("draft model %s failed; speculation by draft model is now off", self.draft.name)
                self.draft = None
                return
            for rows, seconds in self.draft.passes:
                self.pass_time.add(rows, seconds)
            for (seq, _), draft in zip(by_model, drafts, strict=True):
                seq.draft = draft

    def forward_took(self, seconds: float, rows: int | None) -> None:
        """The target's forward of this step took ``seconds``; ``rows`` packed tokens for a decode step (None
        for a step with prefill, which says nothing about what a drafted row costs)."""
        if rows is not None:
            self.step_time.add(rows, seconds)

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.num_drafts += 1
        seq.num_draft_tokens += drafted
        seq.num_accepted_tokens += accepted
        if seq.acceptance is not None:
            seq.acceptance.update(drafted, accepted)
        recent = self.recent.setdefault((self.drafter_of(seq), seq.request.adapter), AcceptanceRate(decay=RECENT_DECAY))
        recent.update(drafted, accepted)

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

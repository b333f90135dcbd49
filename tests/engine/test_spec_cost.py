"""Which drafts pay in a step: the forward-time fit and the batch-wide choice of drafts."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from ftserve.config import SpeculativeConfig
from ftserve.engine.qlinear import padded_rows
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.engine.scheduler import Sequence
from ftserve.engine.spec_cost import PRIOR_ROW_COST, PRIOR_STEP_S, Candidate, StepTime, choose_drafts
from ftserve.engine.speculative import AcceptanceRate
from ftserve.engine.speculator import Speculator


def test_step_time_fits_the_padded_rows() -> None:
    fit = StepTime(padded_rows)
    assert fit.seconds(1) == pytest.approx(PRIOR_STEP_S * (1 + PRIOR_ROW_COST))  # no data: the prior (2 rows)
    for rows in [1, 5, 8, 12, 3, 16, 9, 24] * 3:
        fit.add(rows, 0.040 + 0.003 * padded_rows(rows))
    assert fit.seconds(9) == pytest.approx(0.040 + 0.003 * 16)
    assert fit.seconds(9) == pytest.approx(fit.seconds(16))  # the same panels of 8
    assert fit.seconds(17) > fit.seconds(16)


def test_step_time_scales_the_prior_until_rows_vary() -> None:
    fit = StepTime()
    for _ in range(10):
        fit.add(8, 0.080)  # only plain steps of 8 rows so far
    assert fit.seconds(8) == pytest.approx(0.080)
    assert fit.seconds(16) / fit.seconds(8) == pytest.approx((1 + 15 * PRIOR_ROW_COST) / (1 + 7 * PRIOR_ROW_COST))


def linear(fixed: float, per_row: float) -> Callable[[int], float]:
    return lambda rows: fixed + per_row * rows


def test_good_drafts_are_taken_in_full_when_rows_are_cheap() -> None:
    cands = [Candidate(1, 0.9, 4, False), Candidate(2, 0.8, 3, False)]
    assert choose_drafts(cands, 2, linear(1.0, 0.02), 0.0) == {1: 4, 2: 3}


def test_no_drafts_when_they_do_not_pay() -> None:
    cands = [Candidate(i, 0.3, 4, False) for i in range(8)]
    assert choose_drafts(cands, 8, linear(0.5, 0.06), 0.0) == {}


def test_drafts_fill_free_padding_first_and_by_expected_gain() -> None:
    # A step costs the same up to 8 rows (one panel), twice as much beyond.
    def panels(rows: int) -> float:
        return 1.0 if rows <= 8 else 2.0

    cands = [Candidate(1, 0.2, 4, False), Candidate(2, 0.5, 4, False), Candidate(3, 0.1, 4, False)]
    chosen = choose_drafts(cands, 5, panels, 0.0)
    # Three free rows: gains 0.5 (seq 2), 0.25 (seq 2), 0.2 (seq 1) beat 0.125 (seq 2) and 0.1 (seq 3).
    assert chosen == {2: 2, 1: 1}


def test_a_bigger_batch_drafts_less() -> None:
    def drafted(batch: int) -> int:
        cands = [Candidate(i, 0.6, 4, False) for i in range(batch)]
        return sum(choose_drafts(cands, batch, linear(0.04, 0.004), 0.0).values())

    per_seq = [drafted(b) / b for b in (1, 4, 16, 32)]
    assert per_seq == sorted(per_seq, reverse=True) and per_seq[0] > per_seq[-1]


def test_draft_passes_cost_only_draft_model_tokens() -> None:
    by_lookup = Candidate(1, 0.7, 4, False)
    by_model = Candidate(2, 0.7, 4, True)
    assert choose_drafts([by_lookup, by_model], 2, linear(1.0, 0.01), 0.0) == {1: 4, 2: 4}
    assert choose_drafts([by_lookup, by_model], 2, linear(1.0, 0.01), 5.0) == {1: 4}  # a pass costs 5 steps


def sequence(tokens: list[int], max_tokens: int = 64, adapter: str | None = None) -> Sequence:
    request = GenerationRequest("r", tokens, SamplingParams(max_tokens=max_tokens), adapter)
    seq = Sequence(request, detok=None, generator=None)  # type: ignore[arg-type]  (planning needs neither)
    seq.num_computed = len(tokens) - 1
    return seq


def test_prompt_lookup_counts_only_what_it_found() -> None:
    speculator = Speculator(SpeculativeConfig(drafter="prompt-lookup", num_tokens=6, ngram_history=False), 512)
    seq = sequence([1, 2, 3, 4, 5, 2, 3])  # 2, 3 matched earlier: 4, 5, 2, 3 follow
    nothing = sequence([10, 11, 12, 13])  # no match, no draft
    speculator.begin_step([seq, nothing])
    assert (speculator.draft_len(seq, 10), speculator.draft_len(nothing, 10)) == (4, 0)
    assert speculator.draft_len(seq, 2) == 2  # within the step's token budget
    speculator.propose([(seq, 2)])
    assert seq.draft == [4, 5]


def test_low_acceptance_stops_drafting_in_a_full_panel_but_not_in_padding() -> None:
    config = SpeculativeConfig(drafter="prompt-lookup", num_tokens=4, ngram_history=False)
    speculator = Speculator(config, 512, None, padded_rows)
    for rows in [8, 9, 16, 8, 12, 8, 16, 8] * 4:
        speculator.forward_took(0.050 + 0.004 * padded_rows(rows), rows)
    batch = [sequence([1, 2, 3, 4, 5, 2, 3]) for _ in range(8)]
    for seq in batch:
        seq.acceptance = AcceptanceRate(prior=0.05)  # its drafts have mostly been rejected
    speculator.begin_step(batch)
    assert [speculator.draft_len(seq, 10) for seq in batch] == [0] * 8  # 8 rows fill a panel: no draft pays
    speculator.begin_step(batch[:7])
    assert sum(speculator.draft_len(seq, 10) for seq in batch[:7]) == 1  # the eighth row is free: one probe


def test_without_adaptive_every_sequence_drafts_its_k() -> None:
    config = SpeculativeConfig(drafter="prompt-lookup", num_tokens=3, ngram_history=False, adaptive=False)
    speculator = Speculator(config, 512)
    batch = [sequence([1, 2, 3, 4, 5, 6, 2, 3]) for _ in range(8)]
    speculator.begin_step(batch)
    assert [speculator.draft_len(seq, 10) for seq in batch] == [3] * 8
    assert all(seq.acceptance is None for seq in batch)


def test_drafts_stop_at_max_tokens() -> None:
    speculator = Speculator(SpeculativeConfig(drafter="prompt-lookup", num_tokens=6, ngram_history=False), 512)
    seq = sequence([1, 2, 3, 4, 5, 2, 3], max_tokens=3)
    seq.generated = [7]  # one generated, two left: the pending token and one draft
    speculator.begin_step([seq])
    assert speculator.draft_len(seq, 10) == 1


def test_a_new_request_starts_from_the_drafters_recent_acceptance() -> None:
    speculator = Speculator(SpeculativeConfig(drafter="prompt-lookup", ngram_history=False), 512)
    first = sequence([1, 2, 3, 4, 5, 2, 3])
    speculator.begin_step([first])
    assert first.acceptance is not None and first.acceptance.rate == pytest.approx(0.7)  # nothing seen yet
    for _ in range(40):
        speculator.verified(first, 4, 0)  # this traffic rejects every draft
    second = sequence([1, 2, 3, 4, 5, 2, 3])
    speculator.begin_step([second])
    assert second.acceptance is not None and second.acceptance.rate < 0.2
    other = sequence([1, 2, 3, 4, 5, 2, 3], adapter="a")  # another adapter: its own record
    speculator.begin_step([other])
    assert other.acceptance is not None and other.acceptance.rate == pytest.approx(0.7)


def test_draft_passes_are_costed_by_how_many_sequences_they_carry() -> None:
    draft = SimpleNamespace(model=SimpleNamespace(matmul_rows=lambda rows: rows), name="fake")  # never proposes here
    speculator = Speculator(SpeculativeConfig(drafter="draft-model"), 512, draft)  # type: ignore[arg-type]
    for rows in [1, 2, 4, 8, 12, 16] * 4:
        speculator.forward_took(0.050 + 0.002 * rows, rows)  # verified rows are cheap ...
    for rows in [1, 2, 4, 8] * 4:
        speculator.pass_time.add(rows, 0.004 + 0.025 * rows)  # ... a draft pass over many sequences is not
    alone = sequence([1, 2, 3])
    speculator.begin_step([alone])
    assert speculator.draft_len(alone, 10) > 0
    batch = [sequence([1, 2, 3]) for _ in range(8)]
    speculator.begin_step(batch)
    assert [speculator.draft_len(seq, 10) for seq in batch] == [0] * 8

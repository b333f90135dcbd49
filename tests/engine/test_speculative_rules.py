"""Speculative decoding's pure parts: prompt lookup, the verification rules, acceptance rates."""

from __future__ import annotations

import pytest
import torch

from ftserve.engine.request import SamplingParams
from ftserve.engine.speculative import AcceptanceRate, OutputHistory, PromptLookup, target_probs, verify


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_ngram() -> None:
    lookup = PromptLookup(ngram_max=3, ngram_min=1)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # "6 7" occurs at 1 and 6; the trigram "2 6 7" nowhere before; the latest bigram match (6) wins.
    assert lookup.propose(tokens, 3) == [2, 6, 7]
    assert lookup.propose([1, 2, 3, 1, 2], 4) == [3, 1, 2]  # stops at the end of the text
    assert lookup.propose([1, 2, 3, 4], 4) == []  # no earlier occurrence of anything
    assert PromptLookup(ngram_max=2, ngram_min=2).propose([9, 1, 5, 9, 1], 2) == [5, 9]


def test_greedy_verification_keeps_the_agreeing_prefix_and_adds_the_targets_token() -> None:
    vocab = 10
    want = [3, 4, 5, 6]  # the target's argmax at each of 4 rows
    logits = torch.full((4, vocab), -5.0)
    logits[torch.arange(4), torch.tensor(want)] = 5.0
    greedy = SamplingParams(temperature=0.0)
    assert verify(logits, [3, 4, 5], greedy, None).tokens == [3, 4, 5, 6]  # all kept, plus a bonus
    assert verify(logits, [3, 9, 5], greedy, None).tokens == [3, 4]  # first miss: the target's token
    verdict = verify(logits, [1, 4, 5], greedy, None)
    assert (verdict.tokens, verdict.accepted) == ([3], 0)


def test_sampled_verification_follows_the_target_distribution() -> None:
    """The first emitted token must be distributed as p (row 0), whatever the draft proposes."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, -0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.8, top_p=1.0)
    p = target_probs(logits[0], params)
    trials = 12_000
    for draft_token in (4, 2):  # a likely and an unlikely draft
        counts = torch.zeros(5)
        accepted = 0
        for _ in range(trials):
            verdict = verify(logits, [draft_token], params, gen)
            counts[verdict.tokens[0]] += 1
            accepted += verdict.accepted
        freq = counts / trials
        # Binomial standard error is at most 0.0046 here: 5 sigma.
        assert torch.allclose(freq, p, atol=0.023), (draft_token, freq, p)
        assert accepted / trials == pytest.approx(p[draft_token].item(), abs=0.023)


def test_acceptance_rate_follows_the_drafts_and_recovers() -> None:
    rate = AcceptanceRate(prior=0.7)
    assert rate.rate == pytest.approx(0.7)
    rate.update(0, 0)  # nothing drafted: nothing learned
    assert rate.rate == pytest.approx(0.7)
    for _ in range(30):
        rate.update(4, 0)  # every draft rejected at once
    assert rate.rate < 0.05
    for _ in range(30):
        rate.update(4, 3)  # three accepted per rejection: a = 3 / 4
    assert rate.rate == pytest.approx(0.75, abs=0.01)
    for _ in range(30):
        rate.update(2, 2)  # everything accepted
    assert rate.rate > 0.95


def test_output_history_drafts_an_adapters_template() -> None:
    history = OutputHistory(ngram_max=3, ngram_min=2)
    history.add([7, 8, 9], [1, 2, 3, 4, 5])  # the prompt's last tokens, then the output
    assert history.propose([50, 8, 9], 3) == [1, 2, 3]  # drafts the output's start from the prompt's end
    assert history.propose([60, 2, 3], 8) == [4, 5]
    assert history.propose([60, 70, 80], 4) == []
    lookup = PromptLookup(3, 2)
    assert lookup.propose([40, 41, 42, 2, 3], 2, history) == [4, 5]  # no match in its own text: history's
    assert lookup.propose([2, 3, 9, 2, 3], 2, history) == [9, 2]  # its own text first, at the same length
    assert lookup.propose([2, 3, 9, 1, 2, 3], 2, history) == [4, 5]  # a longer match in history wins


def test_a_token_that_occurs_once_anchors_a_draft_below_the_shortest_ngram() -> None:
    lookup = PromptLookup(ngram_max=3, ngram_min=2)
    prompt = [5, 70, 71, 72, 9, 5, 8]  # 70 (an order number's first piece, say) occurs once, 5 twice
    assert lookup.propose([*prompt, 1, 70], 3) == [71, 72, 9]  # unique: what followed it
    assert lookup.propose([*prompt, 1, 5], 3) == []  # frequent: no guess
    assert PromptLookup(3, 2, anchors=False).propose([*prompt, 1, 70], 3) == []


def test_output_history_is_bounded() -> None:
    history = OutputHistory(ngram_max=2, ngram_min=1, max_ngrams=10)
    for start in range(0, 100, 10):
        history.add([], list(range(start, start + 10)))
    assert len(history) <= 10
    assert history.propose([94, 95], 2) == [96, 97] and history.propose([4, 5], 2) == []  # the oldest went first

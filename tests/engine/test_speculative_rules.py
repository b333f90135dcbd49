"""Speculative decoding's pure parts: prompt lookup, the verification rules, adaptive k."""

from __future__ import annotations

import pytest
import torch

from ftserve.engine.request import SamplingParams
from ftserve.engine.speculative import AdaptiveK, PromptLookup, target_probs, verify


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


def test_adaptive_k_grows_shrinks_switches_off_and_retries() -> None:
    k = AdaptiveK(4, retry_every=3)
    assert k.next_k() == 4
    k.update(4, 1)
    assert k.next_k() == 1
    k.update(1, 1)
    assert k.next_k() == 2
    k.update(2, 0)
    assert k.next_k() == 1
    k.update(1, 0)  # two fully rejected steps in a row: off
    assert [k.next_k() for _ in range(3)] == [0, 0, 1]  # ... then one retry

"""Quality filters: length bounds, exact and near duplicates, PII; the report counts each reason."""

from __future__ import annotations

import random

from ftserve.train.filters import MinHashLSH, apply_filters
from ftserve.train.formats import Example, PreferencePair
from ftserve.train.settings import FilterConfig


def ex(prompt: str, answer: str = "ok") -> Example:
    return Example((("user", prompt),), answer)


LONG_A = "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning."
LONG_B = "Completely different words about invoices, refunds and billing addresses for a customer account."


def test_report_counts_each_reason_and_keeps_order() -> None:
    items = [
        ex(LONG_A),
        ex("hi", ""),  # too short once joined: "hi\n"
        ex(LONG_A.upper()),  # exact duplicate after case folding
        ex(LONG_A.replace("morning", "mornings")),  # near duplicate
        ex(LONG_B),
        ex("x" * 500),  # too long
    ]
    kept, report = apply_filters(items, FilterConfig(min_chars=10, max_chars=300))
    assert kept == [items[0], items[4]]
    assert dict(report.dropped) == {"too_short": 1, "exact_duplicate": 1, "near_duplicate": 1, "too_long": 1}
    assert (report.input, report.kept) == (6, 2)


def test_filters_can_be_turned_off() -> None:
    items = [ex(LONG_A), ex(LONG_A), ex(LONG_A + "!")]
    kept, report = apply_filters(items, FilterConfig(dedup_exact=False, near_dup_threshold=None, pii=False))
    assert kept == items and not report.dropped


def test_pii_is_redacted_in_prompts_and_answers_of_pairs() -> None:
    pair = PreferencePair((("user", "Email bob@mail.test about it"),), "Sent to bob@mail.test", "No")
    [kept], report = apply_filters([pair], FilterConfig())
    assert kept.prompt == (("user", "Email <EMAIL> about it"),)
    assert kept.chosen == "Sent to <EMAIL>"
    assert report.pii["EMAIL"] == 2


def test_minhash_finds_near_duplicates_and_keeps_distinct_texts() -> None:
    rng = random.Random(0)
    words = [f"w{rng.randrange(10_000)}" for _ in range(4000)]
    texts = [" ".join(words[i * 40 : (i + 1) * 40]) for i in range(100)]
    lsh = MinHashLSH(threshold=0.8)
    assert all(lsh.add_if_new(t) for t in texts)  # distinct texts all kept
    near = texts[7].replace(words[7 * 40 + 3], "changed", 1)
    assert not lsh.add_if_new(near)

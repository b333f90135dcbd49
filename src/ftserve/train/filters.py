"""Quality filters: length bounds, exact and near-duplicate removal, PII redaction, with a report.

Near duplicates are found with MinHash over character 5-grams and locality-sensitive hashing (bands of
rows): two texts whose MinHash signatures agree on every row of some band become a candidate pair, and a
candidate is dropped only if its true Jaccard similarity with a kept text reaches the threshold.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from ftserve.train.formats import Example, Item, PreferencePair
from ftserve.train.pii import make_redactor
from ftserve.train.settings import FilterConfig

_MERSENNE = (1 << 61) - 1


@dataclass
class FilterReport:
    """Counts per reason; ``pii`` counts redacted spans per kind."""

    input: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"input": self.input, "kept": self.kept, "dropped": dict(self.dropped), "pii_redacted": dict(self.pii)}

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        pii = ", ".join(f"{k} {v}" for k, v in sorted(self.pii.items())) or "none"
        return f"{self.input} in, {self.kept} kept; dropped: {dropped}; PII redacted: {pii}"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def shingles(text: str, n: int = 5) -> set[int]:
    s = normalize(text)
    if len(s) <= n:
        return {zlib.crc32(s.encode())}
    return {zlib.crc32(s[i : i + n].encode()) for i in range(len(s) - n + 1)}


class MinHashLSH:
    """MinHash signatures (``num_perm`` universal hashes) bucketed by bands for candidate lookup."""

    def __init__(self, threshold: float, num_perm: int = 64, bands: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        self.bands, self.rows = bands, num_perm // bands
        self._a = rng.integers(1, _MERSENNE, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _MERSENNE, num_perm, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self._sets: list[set[int]] = []

    def _signature(self, items: set[int]) -> np.ndarray:
        x = np.fromiter(items, dtype=np.uint64)[:, None]
        # (a*x + b) mod p, computed in uint64 with wraparound; x < 2**32 keeps the mix well spread.
        return ((x * self._a + self._b) % np.uint64(_MERSENNE)).min(axis=0)

    def add_if_new(self, text: str) -> bool:
        """Index ``text`` unless it is a near duplicate of one already indexed; True when added."""
        items = shingles(text)
        sig = self._signature(items)
        keys = [(b, sig[b * self.rows : (b + 1) * self.rows].tobytes()) for b in range(self.bands)]
        candidates = {i for key in keys for i in self._buckets.get(key, ())}
        for i in candidates:
            other = self._sets[i]
            if len(items & other) / len(items | other) >= self.threshold:
                return False
        idx = len(self._sets)
        self._sets.append(items)
        for key in keys:
            self._buckets[key].append(idx)
        return True


def _redact_item(item: Item, redactor, report: FilterReport) -> Item:
    def clean(text: str) -> str:
        out, counts = redactor(text)
        report.pii.update(counts)
        return out

    prompt = tuple((role, clean(content)) for role, content in item.prompt)
    if isinstance(item, PreferencePair):
        return replace(item, prompt=prompt, chosen=clean(item.chosen), rejected=clean(item.rejected))
    return replace(item, prompt=prompt, completion=clean(item.completion))


def apply_filters(items: list[Item], config: FilterConfig) -> tuple[list[Item], FilterReport]:
    """Run the filters in order: PII redaction, length, exact dup, near dup. Order of kept items is kept."""
    report = FilterReport(input=len(items))
    redactor = make_redactor(config.pii_engine) if config.pii else None
    seen: set[str] = set()
    lsh = MinHashLSH(config.near_dup_threshold) if config.near_dup_threshold else None
    kept: list[Item] = []
    for item in items:
        if redactor is not None:
            item = _redact_item(item, redactor, report)
        text = item.text
        if len(text) < config.min_chars:
            report.dropped["too_short"] += 1
            continue
        if len(text) > config.max_chars:
            report.dropped["too_long"] += 1
            continue
        key = hashlib.sha1(normalize(text).encode()).hexdigest()
        if config.dedup_exact and key in seen:
            report.dropped["exact_duplicate"] += 1
            continue
        seen.add(key)
        if lsh is not None and not lsh.add_if_new(text):
            report.dropped["near_duplicate"] += 1
            continue
        kept.append(item)
    report.kept = len(kept)
    return kept, report


__all__ = ["Example", "FilterConfig", "FilterReport", "MinHashLSH", "apply_filters"]

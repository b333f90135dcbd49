"""PII detection and redaction with checked patterns (no model download needed).

Each detector finds spans of one kind; candidates that only look like a kind are dropped by a check where
one exists (Luhn for card numbers, ISO 13616 mod-97 for IBANs, octet range for IPv4), so order numbers and
prices are not redacted. Presidio is used instead when installed and asked for (``engine: presidio``).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# Phone numbers: optional +country code, then 7+ digits with separators, e.g. +44 20 7946 0958, (555) 123-4567.
_PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum card numbers carry: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters → 10..35, the number mod 97 is 1."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            out.append(m.span())
    return out


def _ip(text: str) -> list[tuple[int, int]]:
    """IPv4 and IPv6 candidates that ``ipaddress`` accepts (so 999.1.1.1 or a clock time are not IPs)."""
    out = []
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            out.append(m.span())
    return out


def _iban(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _IBAN.finditer(text) if iban_ok(m.group())]


_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def _phone(text: str) -> list[tuple[int, int]]:
    return [
        m.span()
        for m in _PHONE.finditer(text)
        if 7 <= len(re.sub(r"\D", "", m.group())) <= 15 and not _DATE.fullmatch(m.group())  # E.164: <= 15
    ]


def _regex(pattern: re.Pattern[str]) -> Callable[[str], list[tuple[int, int]]]:
    return lambda text: [m.span() for m in pattern.finditer(text)]


# Order matters: a span claimed by an earlier kind is not reported again (a card number is not a phone number).
DETECTORS: dict[str, Callable[[str], list[tuple[int, int]]]] = {
    "EMAIL": _regex(_EMAIL),
    "IBAN": _iban,
    "CARD": _card,
    "SSN": _regex(_SSN),
    "IP": _ip,
    "PHONE": _phone,
}


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def find_pii(text: str) -> list[Finding]:
    """Non-overlapping findings, earlier detectors first."""
    taken: list[Finding] = []
    for kind, detect in DETECTORS.items():
        for start, end in detect(text):
            if all(end <= f.start or start >= f.end for f in taken):
                taken.append(Finding(kind, start, end))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, findings: list[Finding] | None = None) -> tuple[str, Counter[str]]:
    """Replace each finding with ``<KIND>``; return the new text and counts per kind."""
    findings = find_pii(text) if findings is None else findings
    counts: Counter[str] = Counter()
    for f in sorted(findings, key=lambda f: f.start, reverse=True):
        text = f"{text[: f.start]}<{f.kind}>{text[f.end :]}"
        counts[f.kind] += 1
    return text, counts


class PresidioRedactor:
    """Presidio's analyzer + anonymizer (optional extra; needs a spaCy model installed by hand)."""

    def __init__(self) -> None:
        from presidio_analyzer import AnalyzerEngine
        from presidio_anonymizer import AnonymizerEngine

        self._analyzer = AnalyzerEngine()
        self._anonymizer = AnonymizerEngine()

    def __call__(self, text: str) -> tuple[str, Counter[str]]:
        results = self._analyzer.analyze(text=text, language="en")
        counts = Counter(r.entity_type for r in results)
        return self._anonymizer.anonymize(text=text, analyzer_results=results).text, counts


def make_redactor(engine: str) -> Callable[[str], tuple[str, Counter[str]]]:
    if engine == "presidio":
        try:
            return PresidioRedactor()
        except (ImportError, OSError) as exc:
            raise RuntimeError(f"PII engine 'presidio' is not usable here ({exc}); use engine: regex") from exc
    return redact

"""PII detection: each kind is found; look-alikes that fail the kind's check are left alone."""

from __future__ import annotations

import pytest

from ftserve.train.pii import find_pii, iban_ok, luhn_ok, redact


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "EMAIL"),
        ("call +44 20 7946 0958 today", "PHONE"),
        ("or (555) 201-3344", "PHONE"),
        ("card 4111 1111 1111 1111 expired", "CARD"),
        ("card 5500-0000-0000-0004", "CARD"),
        ("server 192.168.10.254 is down", "IP"),
        ("v6 host 2001:db8::ff00:42:8329 unreachable", "IP"),
        ("pay to GB82 WEST 1234 5698 7654 32", "IBAN"),
        ("pay to DE89370400440532013000", "IBAN"),
        ("SSN 123-45-6789 on file", "SSN"),
    ],
)
def test_each_kind_is_detected_and_redacted(text: str, kind: str) -> None:
    findings = find_pii(text)
    assert [f.kind for f in findings] == [kind]
    redacted, counts = redact(text)
    assert f"<{kind}>" in redacted and counts[kind] == 1


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails Luhn
        "ticket #4821 from order 402893",  # short ids
        "ordered on 2026-05-14 for 49.99",  # a date and a price
        "SKU ATP-1584-RED x441, code TBL-7781-2040",  # product codes
        "version 1.2.3.4000 and 999.1.1.1",  # not valid IPv4
        "meet at 12:30:45",  # a time is not IPv6
    ],
)
def test_look_alikes_are_not_redacted(text: str) -> None:
    assert find_pii(text) == []
    assert redact(text)[0] == text


def test_an_iban_with_a_wrong_checksum_is_not_reported_as_iban() -> None:
    assert "IBAN" not in {f.kind for f in find_pii("GB00 WEST 1234 5698 7654 32")}


def test_checksums() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_several_kinds_in_one_text_keep_the_rest_intact() -> None:
    text = "I'm Ana (ana@x.io, +1 415 555 0101); card 4111-1111-1111-1111; ticket 77."
    redacted, counts = redact(text)
    assert redacted == "I'm Ana (<EMAIL>, <PHONE>); card <CARD>; ticket 77."
    assert dict(counts) == {"EMAIL": 1, "PHONE": 1, "CARD": 1}

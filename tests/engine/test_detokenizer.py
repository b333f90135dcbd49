"""Incremental detokenization: deltas, held-back stop-string prefixes, and split UTF-8 characters."""

from __future__ import annotations

import pytest

from ftserve.engine.detokenizer import IncrementalDetokenizer

EURO = "€".encode()  # three bytes: e2 82 ac
E_ACUTE = "é".encode()  # two bytes: c3 a9


class FakeDecoder:
    """Token id → byte piece; decode concatenates the bytes and decodes them as UTF-8 with replacement.

    A piece holding part of a multi-byte character decodes to '\\ufffd' on its own, like a byte-level BPE.
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.pieces[i] for i in token_ids).decode("utf-8", errors="replace")


def _detok(
    pieces: list[bytes], stop: tuple[str, ...] = (), prompt: list[bytes] | None = None
) -> tuple[IncrementalDetokenizer, FakeDecoder, list[int]]:
    """A detokenizer over a vocabulary made of ``prompt`` then ``pieces``; returns it and the piece ids."""
    prompt = prompt or []
    decoder = FakeDecoder([*prompt, *pieces])
    prompt_ids = list(range(len(prompt)))
    ids = list(range(len(prompt), len(prompt) + len(pieces)))
    return IncrementalDetokenizer(decoder, stop, prompt_tail=prompt_ids or None), decoder, ids


def _run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


SEQUENCES = {
    "ascii": [b"Hel", b"lo", b",", b" wor", b"ld", b"!"],
    "two_byte_split": [b"caf", E_ACUTE[:1], E_ACUTE[1:], b" au lait"],
    "three_byte_split_in_three": [b"costs ", EURO[:1], EURO[1:2], EURO[2:], b"5"],
    "split_char_at_start_and_end": [E_ACUTE[:1], E_ACUTE[1:] + b"t", b"\xc3\xa9 ", EURO[:2], EURO[2:]],
    "single_token": [b"just one piece"],
}


@pytest.mark.parametrize("pieces", SEQUENCES.values(), ids=SEQUENCES.keys())
@pytest.mark.parametrize("prompt", [[], [b"User: hi ", b"\n"]], ids=["no_prompt", "with_prompt"])
def test_deltas_and_flush_concatenate_to_the_full_decode(pieces: list[bytes], prompt: list[bytes]) -> None:
    detok, decoder, ids = _detok(pieces, prompt=prompt)

    out = "".join(_run(detok, ids)) + detok.flush()

    assert out == decoder.decode(ids)
    assert not detok.stopped


@pytest.mark.parametrize("pieces", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_stop_strings_that_never_occur_do_not_change_the_output(pieces: list[bytes]) -> None:
    detok, decoder, ids = _detok(pieces, stop=("<|end|>", "zzz"))

    out = "".join(_run(detok, ids)) + detok.flush()

    assert out == decoder.decode(ids)
    assert not detok.stopped


def test_stop_string_split_across_tokens_is_found_and_excluded() -> None:
    pieces = [b"Answer: 42", b"\n##", b"#", b" EN", b"D", b" trailing", b" more text"]
    detok, _, ids = _detok(pieces, stop=("### END",))

    deltas = _run(detok, ids)

    assert "".join(deltas) == "Answer: 42\n"
    assert detok.stopped
    # The stop completed on the fifth token; nothing after it comes out, by add() or by flush().
    assert deltas[5:] == ["", ""]
    assert detok.flush() == ""


def test_text_after_a_stop_string_in_the_same_token_is_not_released() -> None:
    detok, _, ids = _detok([b"one ", b"two STOP three", b" four"], stop=("STOP",))

    deltas = _run(detok, ids)

    assert deltas == ["one ", "two ", ""]
    assert detok.stopped
    assert detok.flush() == ""


def test_prefix_of_a_stop_string_is_held_back_until_the_match_fails() -> None:
    detok, _, ids = _detok([b"go ", b"ST", b"O", b"RM", b"!"], stop=("STOP",))

    deltas = _run(detok, ids)

    # "ST" and "STO" could still become "STOP": held back. "STORM" cannot: released at once.
    assert deltas == ["go ", "", "", "STORM", "!"]
    assert not detok.stopped


def test_held_back_text_is_only_the_part_that_could_start_a_stop_string() -> None:
    detok, _, ids = _detok([b"abc<", b"/e", b"x"], stop=("</end>",))

    deltas = _run(detok, ids)

    assert deltas == ["abc", "", "</ex"]


def test_flush_releases_a_partial_stop_prefix_held_back_at_the_end() -> None:
    detok, _, ids = _detok([b"the end is ", b"ne"], stop=("never",))

    deltas = _run(detok, ids)

    assert deltas == ["the end is ", ""]
    assert detok.flush() == "ne"
    assert not detok.stopped


def test_incomplete_utf8_character_is_released_only_when_complete() -> None:
    detok, _, ids = _detok([b"price: ", EURO[:1], EURO[1:2], EURO[2:], b"9"])

    deltas = _run(detok, ids)

    assert deltas == ["price: ", "", "", "€", "9"]
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_at_the_end_of_generation_is_released_by_flush() -> None:
    detok, decoder, ids = _detok([b"ok ", E_ACUTE[:1]])

    deltas = _run(detok, ids)

    assert deltas == ["ok ", ""]
    assert detok.flush() == decoder.decode(ids[1:]) == "\ufffd"


def test_stop_string_ending_in_a_split_character_is_found_when_the_character_completes() -> None:
    detok, _, ids = _detok([b"x caf", E_ACUTE[:1], E_ACUTE[1:] + b" more"], stop=("café",))

    deltas = _run(detok, ids)

    assert deltas == ["x ", "", ""]
    assert detok.stopped


@pytest.mark.parametrize("stop", [("two", "one"), ("one", "two")], ids=["later_listed_first", "in_order"])
def test_earliest_occurrence_among_several_stop_strings_wins(stop: tuple[str, ...]) -> None:
    # Both stop strings complete in the same token; the one that starts first cuts the text.
    detok, _, ids = _detok([b"zero ", b"one two three"], stop=stop)

    deltas = _run(detok, ids)

    assert "".join(deltas) == "zero "
    assert detok.stopped


def test_earliest_start_wins_over_a_shorter_stop_string_that_ends_first() -> None:
    # "abcde" starts before "cd" even though "cd" is contained in it and ends earlier.
    detok, _, ids = _detok([b"x", b"abcdey"], stop=("cd", "abcde"))

    deltas = _run(detok, ids)

    assert "".join(deltas) == "x"
    assert detok.stopped


def test_the_longest_possible_stop_prefix_among_several_stop_strings_is_held_back() -> None:
    detok, _, ids = _detok([b"well, th", b"e", b"n"], stop=("the end", "h!"))

    deltas = _run(detok, ids)

    # "th" could start "the end"; "h" alone could start "h!" — the longer hold wins. "then" matches neither.
    assert deltas == ["well, ", "", "then"]


def test_empty_stop_strings_are_ignored() -> None:
    detok, decoder, ids = _detok([b"a", b"b"], stop=("",))

    assert "".join(_run(detok, ids)) + detok.flush() == decoder.decode(ids)
    assert not detok.stopped


def test_prompt_context_is_not_part_of_the_output() -> None:
    detok, _, ids = _detok([b" world", b"!"], prompt=[b"Say: ", b"hello"])

    assert "".join(_run(detok, ids)) + detok.flush() == " world!"


def test_flush_does_not_release_a_stop_string_hidden_behind_an_incomplete_character() -> None:
    detok, _, ids = _detok([b"ab", b"STOP" + EURO[:1]], stop=("STOP",))

    out = "".join(_run(detok, ids)) + detok.flush()

    assert "STOP" not in out


def test_prompt_context_ending_mid_character_does_not_leak_into_the_output() -> None:
    detok, _, ids = _detok([EURO[2:], b" each"], prompt=[b"Price: 3 ", EURO[:2]])

    out = "".join(_run(detok, ids)) + detok.flush()

    assert "Price" not in out

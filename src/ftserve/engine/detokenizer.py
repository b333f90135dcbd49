"""Incremental detokenization with stop strings.

Text is released only when it is final: bytes of a multi-byte character split across tokens are held
until complete, and a tail that could still grow into a stop string is held until it cannot.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas and finds stop strings across token boundaries."""

    def __init__(self, decoder: Decoder, stop: tuple[str, ...] = (), prompt_tail: list[int] | None = None):
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        # A few prompt tokens give the decoder context, so a leading space is decoded correctly.
        self._context = list(prompt_tail or [])
        self._ids: list[int] = []
        self._text = ""  # decoded text of all generated tokens that form complete characters
        self._released = 0  # characters of _text already handed out
        self.stopped = False  # a stop string was found; the text ends before it

    def _decode_generated(self) -> str:
        ctx = self._decoder.decode(self._context, skip_special_tokens=True)
        full = self._decoder.decode(self._context + self._ids, skip_special_tokens=True)
        # Normally ``full`` starts with ``ctx``. When the context ends inside a multi-byte character, ``ctx``
        # ends in U+FFFD that ``full`` completes: keep only what follows the common part.
        return full[_common_prefix_len(ctx, full) :]

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._decode_generated()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._scan(text, final=False)

    def flush(self) -> str:
        """At the end of generation: release what is held back (a stop-string prefix that never completed,
        a trailing incomplete character), still cutting at a stop string."""
        if self.stopped:
            return ""
        return self._scan(self._decode_generated(), final=True)

    def _scan(self, text: str, final: bool) -> str:
        """Take the decoded text, cut it at the first stop string, and release what is final."""
        self._text = text
        if not self._stop:
            return self._release(len(text))
        # Search only where a new match can start: just before the released part, onward.
        start = max(0, self._released - max(len(s) for s in self._stop) + 1)
        hits = [i for s in self._stop if (i := text.find(s, start)) != -1]
        if hits:
            self._text = text[: min(hits)]
            self.stopped = True
            return self._release(len(self._text))
        return self._release(len(text) if final else len(text) - self._partial_stop_len())

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        delta = self._text[self._released : upto]
        self._released = upto
        return delta


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

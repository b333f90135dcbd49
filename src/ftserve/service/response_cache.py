"""Exact-match cache of whole responses to deterministic requests.

A request is deterministic when it is greedy (temperature 0) or carries a seed: the same adapter version,
prompt tokens and sampling parameters then give the same tokens. The key hashes exactly those (the
adapter's content hash, not only its name, so an entry never answers for another version of an adapter).
Entries keep every streamed update, so a hit replays as a stream, and are bounded in bytes (least recently
used go first) and in age (TTL). Reloading or unloading an adapter drops its entries.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ftserve.engine.request import FinishReason, SamplingParams

ENTRY_OVERHEAD_BYTES = 256  # the entry, its key and bookkeeping
CHUNK_OVERHEAD_BYTES = 64


@dataclass(frozen=True)
class CachedResponse:
    chunks: tuple[tuple[str, tuple[int, ...]], ...]  # (text, token ids) of each streamed update, in order
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generated_tokens: int

    @property
    def size_bytes(self) -> int:
        data = sum(len(text.encode()) + 4 * len(ids) + CHUNK_OVERHEAD_BYTES for text, ids in self.chunks)
        return data + ENTRY_OVERHEAD_BYTES


def cacheable(params: SamplingParams) -> bool:
    return params.greedy or params.seed is not None


def cache_key(adapter: str | None, version: str | None, prompt_ids: list[int], params: SamplingParams) -> str:
    """Adapter name and content hash, the prompt's token ids (the rendered prompt) and every sampling field."""
    payload = {
        "adapter": adapter,
        "version": version,
        "prompt": prompt_ids,
        "params": params.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class _Entry:
    adapter: str | None
    response: CachedResponse
    expires: float


class ResponseCache:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.size_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.response

    def put(self, key: str, adapter: str | None, response: CachedResponse) -> bool:
        """Store a response; False when it alone is larger than the whole cache."""
        size = response.size_bytes
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        while self.size_bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = _Entry(adapter, response, self._clock() + self.ttl_s)
        self.size_bytes += size
        return True

    def invalidate(self, adapter: str | None) -> int:
        """Drop every entry of ``adapter`` (None: the base model); returns how many."""
        keys = [key for key, entry in self._entries.items() if entry.adapter == adapter]
        for key in keys:
            self._drop(key)
        return len(keys)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.size_bytes -= entry.response.size_bytes

"""The response cache on its own: keys, LRU bound in bytes, TTL, invalidation."""

from __future__ import annotations

import pytest

from ftserve.engine.request import FinishReason, SamplingParams
from ftserve.service.response_cache import CachedResponse, ResponseCache, cache_key, cacheable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def response(text: str) -> CachedResponse:
    return CachedResponse(((text, (1, 2)), ("", ())), FinishReason.STOP, 3, 2)


def test_only_greedy_or_seeded_requests_are_cacheable() -> None:
    assert cacheable(SamplingParams(temperature=0.0))
    assert cacheable(SamplingParams(temperature=0.8, seed=7))
    assert not cacheable(SamplingParams(temperature=0.8))


@pytest.mark.parametrize(
    "other",
    [
        ("other-adapter", "v1", [1, 2, 3], SamplingParams(temperature=0.0)),
        ("a", "v2", [1, 2, 3], SamplingParams(temperature=0.0)),  # same name, new weights
        ("a", "v1", [1, 2, 4], SamplingParams(temperature=0.0)),
        ("a", "v1", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=17)),
        ("a", "v1", [1, 2, 3], SamplingParams(temperature=0.0, stop=("x",))),
        (None, None, [1, 2, 3], SamplingParams(temperature=0.0)),
    ],
)
def test_key_changes_with_adapter_version_prompt_and_every_sampling_field(other: tuple) -> None:
    key = cache_key("a", "v1", [1, 2, 3], SamplingParams(temperature=0.0))
    assert key == cache_key("a", "v1", [1, 2, 3], SamplingParams(temperature=0.0))
    assert key != cache_key(*other)


def test_least_recently_used_entries_go_when_bytes_run_out() -> None:
    size = response("x" * 100).size_bytes
    cache = ResponseCache(max_bytes=2 * size + size // 2, ttl_s=60)
    for key in ("a", "b"):
        assert cache.put(key, None, response("x" * 100))
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", None, response("x" * 100))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.size_bytes == 2 * size <= cache.max_bytes


def test_an_entry_larger_than_the_cache_is_not_stored() -> None:
    cache = ResponseCache(max_bytes=100, ttl_s=60)
    assert not cache.put("big", None, response("x" * 1000))
    assert len(cache) == 0 and cache.size_bytes == 0


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(max_bytes=1 << 20, ttl_s=10, clock=clock)
    cache.put("k", None, response("hello"))
    clock.now = 9.9
    assert cache.get("k") == response("hello")
    clock.now = 10.0
    assert cache.get("k") is None
    assert cache.size_bytes == 0


def test_invalidating_an_adapter_drops_only_its_entries() -> None:
    cache = ResponseCache(max_bytes=1 << 20, ttl_s=60)
    cache.put("a1", "a", response("1"))
    cache.put("a2", "a", response("2"))
    cache.put("b1", "b", response("3"))
    cache.put("base", None, response("4"))
    assert cache.invalidate("a") == 2
    assert cache.get("a1") is None and cache.get("a2") is None
    assert cache.get("b1") is not None and cache.get("base") is not None

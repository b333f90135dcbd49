"""Replica selection: rendezvous hashing, holders and residency first, bounded load."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from ftserve.router.select import NoReadyReplicaError, ReplicaView, Residency, load_limit, plan, rendezvous_score

URLS = [f"http://10.0.0.{i}:3000" for i in range(1, 6)]
NAMES = [f"adapter-{i}" for i in range(600)]


def _fleet(urls: list[str], **overrides: ReplicaView) -> list[ReplicaView]:
    return [overrides.get(url, ReplicaView(url, ready=True)) for url in urls]


def _first(model: str, replicas: list[ReplicaView], factor: float = 1.25) -> str:
    return plan(model, replicas, factor)[0].url


def test_one_adapter_always_goes_to_the_same_replica_whatever_the_listing_order() -> None:
    shuffled = list(URLS)
    random.Random(3).shuffle(shuffled)
    for name in NAMES[:50]:
        assert _first(name, _fleet(URLS)) == _first(name, _fleet(shuffled)) == _first(name, _fleet(URLS))


def test_adapters_spread_over_every_replica() -> None:
    counts = {url: 0 for url in URLS}
    for name in NAMES:
        counts[_first(name, _fleet(URLS))] += 1
    # 600 names over 5 replicas: 120 expected each; a broken hash would put most on one replica.
    assert all(60 <= count <= 180 for count in counts.values()), counts


def test_a_replica_leaving_moves_only_the_adapters_it_had() -> None:
    before = {name: _first(name, _fleet(URLS)) for name in NAMES}
    gone = URLS[2]
    after = {name: _first(name, _fleet([u for u in URLS if u != gone])) for name in NAMES}
    moved = {name for name in NAMES if before[name] != after[name]}
    assert moved == {name for name in NAMES if before[name] == gone}
    assert moved  # the departed replica did have a share


def test_a_replica_joining_takes_adapters_only_for_itself() -> None:
    small = URLS[:4]
    before = {name: _first(name, _fleet(small)) for name in NAMES}
    after = {name: _first(name, _fleet(URLS)) for name in NAMES}
    moved = [name for name in NAMES if before[name] != after[name]]
    assert moved and all(after[name] == URLS[4] for name in moved)


def test_the_hash_is_the_same_in_another_process() -> None:
    # Python's hash() is salted per process; routers must agree without sharing state.
    code = "from ftserve.router.select import rendezvous_score as s; print(s('adapter-7', 'http://10.0.0.1:3000'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == rendezvous_score("adapter-7", "http://10.0.0.1:3000")


def test_a_holder_comes_before_the_replicas_that_do_not_hold_the_adapter() -> None:
    name = "adapter-1"
    last = plan(name, _fleet(URLS), 1.25)[-1].url  # the replica hashing would try last
    holder = ReplicaView(last, ready=True, holdings={name: Residency.DISK})
    choices = plan(name, _fleet(URLS, **{last: holder}), 1.25)
    assert choices[0].url == last and choices[0].residency is Residency.DISK
    assert all(c.residency is None for c in choices[1:])


def test_holders_are_ordered_by_residency_device_then_cpu_then_disk() -> None:
    name = "adapter-2"
    hash_order = [c.url for c in plan(name, _fleet(URLS), 1.25)]
    # Give the worst-hashed replicas the best residencies, so only residency can explain the order.
    held = {
        hash_order[4]: ReplicaView(hash_order[4], True, holdings={name: Residency.DEVICE}),
        hash_order[3]: ReplicaView(hash_order[3], True, holdings={name: Residency.CPU}),
        hash_order[2]: ReplicaView(hash_order[2], True, holdings={name: Residency.DISK}),
    }
    choices = plan(name, _fleet(URLS, **held), 1.25)
    assert [c.url for c in choices] == [hash_order[4], hash_order[3], hash_order[2], hash_order[0], hash_order[1]]


def test_an_unknown_residency_counts_as_the_worst() -> None:
    assert Residency.parse("device") is Residency.DEVICE
    assert Residency.parse("somewhere-new") is Residency.DISK


def test_bounded_load_spills_to_the_next_replica_in_hash_order() -> None:
    urls = URLS[:3]
    name = "adapter-3"
    top, second, third = (c.url for c in plan(name, _fleet(urls), 1.25))

    def with_load(n: int) -> list[ReplicaView]:
        return _fleet(urls, **{top: ReplicaView(top, True, in_flight=n)})

    # in_flight 1 of 1 in all: mean 1/3, limit 1.25 * 1/3 + 1 ≈ 1.42 -> still within
    assert [c.url for c in plan(name, with_load(1), 1.25)] == [top, second, third]
    # in_flight 2 of 2: mean 2/3, limit ≈ 1.83 -> over: the next in hash order takes it, top goes last
    choices = plan(name, with_load(2), 1.25)
    assert [c.url for c in choices] == [second, third, top]
    assert choices[-1].overloaded and not choices[0].overloaded
    # a larger factor tolerates the same load
    assert plan(name, with_load(2), 2.0)[0].url == top


def test_an_overloaded_holder_yields_to_a_replica_without_the_adapter() -> None:
    urls = URLS[:2]
    name = "adapter-4"
    holder = ReplicaView(urls[0], True, in_flight=5, holdings={name: Residency.DEVICE})
    choices = plan(name, [holder, ReplicaView(urls[1], True)], 1.25)
    assert [c.url for c in choices] == [urls[1], urls[0]]


def test_the_least_loaded_replica_is_never_over_the_limit() -> None:
    rng = random.Random(0)
    for _ in range(300):
        fleet = [ReplicaView(url, True, in_flight=rng.randrange(0, 40)) for url in URLS]
        least = min(r.in_flight for r in fleet)
        assert least <= load_limit(fleet, 1.0)
        assert not plan("adapter-5", fleet, 1.0)[0].overloaded


def test_replicas_that_are_not_ready_are_never_chosen() -> None:
    fleet = [ReplicaView(URLS[0], False, holdings={"adapter-6": Residency.DEVICE}), ReplicaView(URLS[1], True)]
    assert [c.url for c in plan("adapter-6", fleet, 1.25)] == [URLS[1]]


def test_no_ready_replica_is_an_error() -> None:
    with pytest.raises(NoReadyReplicaError):
        plan("adapter-7", [ReplicaView(url, False) for url in URLS], 1.25)
    with pytest.raises(NoReadyReplicaError):
        plan(None, [], 1.25)


def test_a_request_without_a_model_goes_to_the_least_busy_replica() -> None:
    fleet = [ReplicaView(URLS[0], True, in_flight=3), ReplicaView(URLS[1], True, in_flight=0)]
    assert [c.url for c in plan(None, fleet, 1.25)] == [URLS[1], URLS[0]]

"""Which replica serves a request: pure functions over a snapshot of the replicas, no I/O.

The order is: replicas that hold the adapter (best residency first), then the others; within a group,
rendezvous (highest-random-weight) hashing of ``(model, replica URL)``; then bounded load moves a replica
that already carries more than its share behind the others. The result is a full preference list, so the
proxy can fall through to the next replica when one cannot be reached.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class Residency(enum.IntEnum):
    """Where a replica keeps an adapter; a lower value is a better place to send its requests."""

    DEVICE = 0  # in a compute slot: runs at once
    CPU = 1  # weights in host memory: a copy to the device first
    DISK = 2  # registered, weights dropped: re-read on next use (still cheaper than a first load)

    @classmethod
    def parse(cls, value: object) -> Residency:
        """The admin API's ``residency`` string; an unknown value counts as the worst place."""
        try:
            return cls[str(value).upper()]
        except KeyError:
            return cls.DISK


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the selection sees it at one moment."""

    url: str  # base URL, e.g. http://10.0.0.7:3000 (also the hash key)
    ready: bool  # its /readyz answered 200 at the last refresh
    in_flight: int = 0  # requests this router has sent to it and not finished
    holdings: Mapping[str, Residency] = field(default_factory=dict)  # adapter name -> residency


@dataclass(frozen=True)
class Choice:
    """One replica to try, in order."""

    url: str
    residency: Residency | None  # None: the replica does not hold the adapter (it loads on first use)
    overloaded: bool  # over the bounded-load limit: tried only after every other candidate


class NoReadyReplicaError(Exception):
    """No replica is ready to take a request."""


def rendezvous_score(key: str, url: str) -> int:
    """A stable 64-bit weight of ``(key, url)``: the same on every router process and every run.

    ``hash()`` is salted per process, so two routers (or one after a restart) would disagree; blake2b is
    fast and well mixed, and the NUL byte keeps ``("a", "bc")`` and ``("ab", "c")`` apart.
    """
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_limit(replicas: Sequence[ReplicaView], max_load_factor: float) -> float:
    """Bounded-load limit (consistent hashing with bounded loads, Mirrokni et al. 2018): a replica carrying
    more than ``max_load_factor`` times the mean in-flight count, plus one, is skipped.

    The ``+ 1`` lets an idle fleet keep a hot adapter on one replica for a few requests instead of spilling
    at the second. With ``max_load_factor >= 1`` the least-loaded replica (at or below the mean) is never
    over the limit, so some replica always takes the request.
    """
    ready = [r for r in replicas if r.ready]
    if not ready:
        return 0.0
    mean = sum(r.in_flight for r in ready) / len(ready)
    return max_load_factor * mean + 1


def plan(model: str | None, replicas: Sequence[ReplicaView], max_load_factor: float) -> list[Choice]:
    """Every ready replica, best first, for a request to ``model``.

    ``model`` None (a request that names none, or a path that is not a generation) orders by in-flight
    count only: any ready replica will do, the least busy first. Raises NoReadyReplicaError if none is ready.
    """
    ready = [r for r in replicas if r.ready]
    if not ready:
        raise NoReadyReplicaError("no replica is ready")
    limit = load_limit(ready, max_load_factor)
    if model is None:
        ordered = sorted(ready, key=lambda r: (r.in_flight, r.url))
        return [Choice(r.url, None, r.in_flight > limit) for r in ordered]

    def preference(r: ReplicaView) -> tuple[int, int]:
        residency = r.holdings.get(model)
        # Holders first, by residency; non-holders after them; ties broken by the rendezvous weight, so
        # a replica joining or leaving moves only the adapters whose top choice it is (or was).
        tier = len(Residency) if residency is None else int(residency)
        return tier, -rendezvous_score(model, r.url)

    choices = [Choice(r.url, r.holdings.get(model), r.in_flight > limit) for r in sorted(ready, key=preference)]
    # A stable sort: within-limit replicas keep their preference order, the overloaded ones go last.
    return sorted(choices, key=lambda c: c.overloaded)

"""The replicas the router knows: discovery (static URLs and DNS), readiness and adapter polls, in-flight counts.

``refresh()`` is one complete poll (awaitable, so tests and admin writes can trigger it deterministically);
``run()`` repeats it every ``refresh_s``. What a replica holds comes from its admin API
(``GET /v1/adapters`` with the bearer token): the adapters registered in its engine, with their residency.
The public ``/v1/models`` cannot tell, since it also lists adapters that would only load on first use.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx

from ftserve.router.metrics import RouterMetrics
from ftserve.router.select import Choice, ReplicaView, Residency, plan
from ftserve.router.settings import RouterConfig

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """Mutable state of one replica; only the event loop's thread touches it."""

    url: str
    ready: bool = False
    in_flight: int = 0  # requests sent through this router and not finished
    holdings: dict[str, Residency] = field(default_factory=dict)  # adapter -> residency, from the admin API
    known: frozenset[str] = frozenset()  # adapters it holds or lists as available
    problem: str | None = None  # why it is not ready / its adapters are unknown (logged once per change)

    def view(self) -> ReplicaView:
        return ReplicaView(self.url, self.ready, self.in_flight, dict(self.holdings))


def resolve_replicas(name: str, port: int) -> list[str]:
    """Base URLs of every A/AAAA record of ``name`` (blocking: call it in a thread)."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    urls = set()
    for family, *_, sockaddr in infos:
        host = str(sockaddr[0])
        urls.add(f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}")
    return sorted(urls)


class ReplicaPool:
    def __init__(
        self, config: RouterConfig, client: httpx.AsyncClient, metrics: RouterMetrics, token: str | None
    ) -> None:
        self.config = config
        self.client = client
        self.metrics = metrics
        self._token = token or None
        self.replicas: dict[str, Replica] = {}
        self._dns_urls: list[str] = []  # the last successful resolution, kept while DNS fails
        self._dns_problem: str | None = None
        self._lock = asyncio.Lock()

    # -- discovery and polls ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolve the replicas, then poll each one's readiness and adapters (all at once)."""
        async with self._lock:
            urls = [*self.config.replicas, *(u for u in await self._resolve() if u not in self.config.replicas)]
            for url in urls:
                if url not in self.replicas:
                    log.info("replica %s joined", url)
                    self.replicas[url] = Replica(url)
                    self.metrics.in_flight.labels(url).set(0)
            for url in [u for u in self.replicas if u not in urls]:
                log.info("replica %s left", url)
                del self.replicas[url]
                self.metrics.forget(url)
            await asyncio.gather(*(self._poll(replica) for replica in self.replicas.values()))

    async def run(self) -> None:
        """Refresh every ``refresh_s`` (the first after one interval) until cancelled; a failed refresh is
        logged and retried at the next interval."""
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("replica refresh failed")

    async def _resolve(self) -> list[str]:
        if self.config.dns_name is None:
            return []
        try:
            self._dns_urls = await asyncio.to_thread(resolve_replicas, self.config.dns_name, self.config.replica_port)
            problem = None if self._dns_urls else "no records"
        except OSError as exc:  # socket.gaierror: keep the last known set; readiness polls still check it
            problem = str(exc)
        if problem != self._dns_problem:
            if problem is None:
                log.info("DNS %s resolves again", self.config.dns_name)
            else:
                log.warning(
                    "DNS %s: %s (keeping %d known replicas)", self.config.dns_name, problem, len(self._dns_urls)
                )
            self._dns_problem = problem
        return self._dns_urls

    async def _poll(self, replica: Replica) -> None:
        ready, problem, holdings, known = False, None, {}, frozenset[str]()
        try:
            res = await self.client.get(f"{replica.url}/readyz", timeout=self.config.probe_timeout_s)
            ready = res.status_code == 200
            problem = None if ready else f"/readyz answered {res.status_code}"
            if ready and self._token is not None:
                holdings, known = await self._adapters(replica.url)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}" if not ready else f"adapters unknown: {type(exc).__name__}"
        except _AdminError as exc:
            problem = str(exc)
        self._set(replica, ready, problem)
        replica.holdings, replica.known = holdings, known
        for residency in Residency:
            count = sum(1 for r in holdings.values() if r is residency)
            self.metrics.held.labels(replica.url, residency.name.lower()).set(count)

    async def _adapters(self, url: str) -> tuple[dict[str, Residency], frozenset[str]]:
        headers = {"Authorization": f"Bearer {self._token}"}
        res = await self.client.get(f"{url}/v1/adapters", headers=headers, timeout=self.config.probe_timeout_s)
        if res.status_code != 200:
            raise _AdminError(f"adapters unknown: GET /v1/adapters answered {res.status_code}")
        try:
            body: Any = res.json()
            cards = [c for c in body["data"] if not c.get("draining")]  # draining: refuses new requests
            holdings = {str(c["id"]): Residency.parse(c.get("residency")) for c in cards}
            available = {str(name) for name in body.get("available", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _AdminError(f"adapters unknown: unexpected GET /v1/adapters body ({exc!r})") from None
        return holdings, frozenset(holdings) | frozenset(available)

    def _set(self, replica: Replica, ready: bool, problem: str | None) -> None:
        if ready != replica.ready:
            log.info("replica %s is %s", replica.url, "ready" if ready else f"not ready ({problem})")
        elif problem != replica.problem and problem is not None:
            log.warning("replica %s: %s", replica.url, problem)
        replica.ready, replica.problem = ready, problem
        self.metrics.ready.labels(replica.url).set(1 if ready else 0)

    # -- routing ----------------------------------------------------------------------------------------

    def plan(self, model: str | None) -> list[Choice]:
        """Ready replicas, best first, for ``model`` (see :func:`ftserve.router.select.plan`)."""
        return plan(model, [r.view() for r in self.replicas.values()], self.config.max_load_factor)

    def ready_urls(self) -> list[str]:
        return [url for url, r in self.replicas.items() if r.ready]

    def knows(self, name: str) -> bool:
        """A replica holds or lists this adapter name (bounds the ``adapter`` metric label)."""
        return any(name in r.known for r in self.replicas.values())

    def mark_unreachable(self, url: str, reason: str) -> None:
        """A proxied request could not connect: stop sending there until the next refresh says otherwise."""
        if (replica := self.replicas.get(url)) is not None:
            self._set(replica, False, reason)

    def acquire(self, url: str) -> Replica | None:
        """Count a request against a replica; None if it left since the plan was made."""
        replica = self.replicas.get(url)
        if replica is not None:
            replica.in_flight += 1
            self.metrics.in_flight.labels(url).set(replica.in_flight)
        return replica

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if self.replicas.get(replica.url) is replica:  # a replica that left has no series any more
            self.metrics.in_flight.labels(replica.url).set(replica.in_flight)

    def status(self) -> list[dict[str, Any]]:
        """What ``GET /router/replicas`` shows."""
        return [
            {"url": r.url, "ready": r.ready, "in_flight": r.in_flight, "problem": r.problem,
             "adapters": {name: res.name.lower() for name, res in sorted(r.holdings.items())}}
            for r in self.replicas.values()
        ]  # fmt: skip


class _AdminError(Exception):
    """The admin API did not say what a replica holds."""

"""The router's Prometheus metrics, all named ``ftserve_router_*``, on a registry of its own.

A registry per router (not the process-wide default) keeps two routers in one process (tests) apart and
keeps the replicas' own ``ftserve_*`` families out of the router's ``/metrics``.

Label values are bounded: ``replica`` is a known replica URL, and ``adapter`` is the request's ``model`` only
when a replica holds or lists that name or the request succeeded; any other name is ``other``, so clients
sending random model names cannot grow the series without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

NO_MODEL = "none"  # adapter label of requests that name no model (or are not generations)
OTHER = "other"  # adapter label of names no replica knows


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ftserve_router_requests",
            "Requests, by adapter, replica and outcome: the replica's status class (ok, client_error, "
            "server_error), upstream_error (no answer), unavailable (no replica took it; replica empty), "
            "bad_request (refused by the router; replica empty).",
            ("adapter", "replica", "outcome"),
            registry=self.registry,
        )
        self.affinity_hits = Counter(
            "ftserve_router_affinity_hits",
            "Generation requests sent to a replica that held the adapter.",
            ("adapter",),
            registry=self.registry,
        )
        self.aborted = Counter(
            "ftserve_router_aborted_streams",
            "Responses that ended early: the client disconnected, or the replica broke off (upstream_error).",
            ("replica", "reason"),
            registry=self.registry,
        )
        self.failovers = Counter(
            "ftserve_router_failovers",
            "Replicas skipped after the request could not be placed there (connect failed, or it answered 503).",
            ("replica", "reason"),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ftserve_router_in_flight_requests",
            "Requests this router has sent to a replica and not finished.",
            ("replica",),
            registry=self.registry,
        )
        self.ready = Gauge(
            "ftserve_router_replica_ready",
            "1 when the replica's /readyz answered 200 at the last refresh, else 0.",
            ("replica",),
            registry=self.registry,
        )
        self.held = Gauge(
            "ftserve_router_replica_adapters",
            "Adapters a replica holds, by residency (device, cpu, disk).",
            ("replica", "residency"),
            registry=self.registry,
        )

    def forget(self, url: str) -> None:
        """Drop the series of a replica that left, so dashboards do not show it forever."""
        for gauge in (self.in_flight, self.ready):
            gauge.remove(url)
        for residency in ("device", "cpu", "disk"):
            self.held.remove(url, residency)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def outcome_of(status: int) -> str:
    """The ``outcome`` label of a replica's answer."""
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "server_error"

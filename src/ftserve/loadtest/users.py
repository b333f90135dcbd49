"""Locust users: one streams OpenAI chat completions over REST, the other ``Generate`` over gRPC (a custom
Locust client: Locust has none for gRPC). Both draw from the same request plan and time the stream
themselves (see ``samples.py``); each request is also reported to Locust as two events, ``<PROTO> TTFT``
and ``<PROTO> E2E`` named by adapter, so Locust's own statistics show what a stream costs rather than the
time to its headers.

Importing this module patches grpc for gevent; the process must have been monkey-patched by gevent first
(``locust`` does that on import, ``ftserve.loadtest.run`` does it on its first line).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import ClassVar

import grpc.experimental.gevent as grpc_gevent
from locust import User, between, task

from ftserve.client import GrpcClient, RestClient
from ftserve.loadtest.prompts import RequestPlan
from ftserve.loadtest.samples import Sample, timed_request
from ftserve.loadtest.settings import ScenarioFile

grpc_gevent.init_gevent()  # grpc's own threads would block gevent's loop; must precede any channel


@dataclass
class LoadContext:
    """What every user of a run shares: where to send, what to send, and where results go."""

    host: str
    grpc_target: str
    plan: RequestPlan
    seed: int
    timeout_s: float
    started: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)
    stopping: bool = False  # set when the run's time is up: requests it cuts short are not the service's failures


class _StreamingUser(User):
    """A user that sends one streamed request after another, with think time between."""

    abstract = True
    protocol: ClassVar[str]
    context: ClassVar[LoadContext]
    _numbers: ClassVar[itertools.count[int]] = itertools.count()

    def on_start(self) -> None:
        # Each user gets its own reproducible stream of choices.
        self.rng = random.Random(self.context.seed * 100_003 + next(self._numbers))
        self.api = self.connect()

    def on_stop(self) -> None:
        self.api.close()

    def connect(self) -> GrpcClient | RestClient:
        raise NotImplementedError

    @task
    def generate(self) -> None:
        planned = self.context.plan.next(self.rng)
        sample = timed_request(self.api, planned, self.protocol, self.context.started)
        if self.context.stopping:
            return  # the run ended while it streamed (its connection is being torn down): not a finished request
        self.context.samples.append(sample)
        self._report(sample)

    def _report(self, sample: Sample) -> None:
        """The request as Locust events, so Locust's statistics and its failure table see it too."""
        failure = None if sample.ok else RuntimeError(sample.error or "failed")
        kind = self.protocol.upper()
        if sample.ttft_s is not None:
            self._fire(f"{kind} TTFT", sample, sample.ttft_s, None)
        self._fire(f"{kind} E2E", sample, sample.e2e_s, failure)

    def _fire(self, request_type: str, sample: Sample, seconds: float, failure: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=sample.adapter,
            response_time=seconds * 1000.0,
            response_length=sample.completion_tokens,
            exception=failure,
            context={"scenario": sample.scenario},
        )


class RestUser(_StreamingUser):
    """OpenAI ``/v1/chat/completions`` with ``stream: true`` (server-sent events)."""

    abstract = True  # concrete once configured
    protocol = "rest"

    def connect(self) -> RestClient:
        return RestClient(self.context.host, timeout_s=self.context.timeout_s)


class GrpcUser(_StreamingUser):
    """``ftserve.v1.Generation/Generate``, server-streaming."""

    abstract = True
    protocol = "grpc"

    def connect(self) -> GrpcClient:
        return GrpcClient(self.context.grpc_target, timeout_s=self.context.timeout_s)


def configure_users(context: LoadContext, plan: ScenarioFile) -> list[type[User]]:
    """The user classes of a run: the protocols with a weight, sharing ``context``, with the plan's think
    time. Locust configures users through class attributes, so each run gets fresh subclasses."""
    classes: list[type[User]] = []
    for base in (RestUser, GrpcUser):
        weight = plan.protocols.get(base.protocol, 0.0)  # type: ignore[call-overload]
        if weight <= 0:
            continue
        attrs = {
            "__module__": __name__,
            "abstract": False,
            "context": context,
            "weight": max(1, round(weight * 100)),
            "wait_time": between(*plan.think_time_s),
            "host": context.host,
        }
        classes.append(type(f"{base.protocol.capitalize()}ChatUser", (base,), attrs))  # RestChatUser, GrpcChatUser
    return classes

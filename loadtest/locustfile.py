"""Locust's own entry point, for the web UI or distributed workers; ``ftserve loadtest`` runs the same users
headless and adds the JSON / markdown report and the SLO verdict.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000
    FTSERVE_GRPC_TARGET=127.0.0.1:50051 FTSERVE_SCENARIOS=loadtest/scenarios.yaml \\
        locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 16 -r 4 -t 2m

Each request is reported as ``REST TTFT`` / ``REST E2E`` (``GRPC ...`` for gRPC) events named by adapter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment

from ftserve.loadtest.cli import base_model_of
from ftserve.loadtest.prompts import RequestPlan
from ftserve.loadtest.settings import load_scenarios
from ftserve.loadtest.users import LoadContext, configure_users

SCENARIOS = load_scenarios(Path(os.environ.get("FTSERVE_SCENARIOS", Path(__file__).with_name("scenarios.yaml"))))
CONTEXT = LoadContext(
    host="",  # Locust's --host, set when the test starts
    grpc_target=os.environ.get("FTSERVE_GRPC_TARGET", "127.0.0.1:50051"),
    plan=RequestPlan(SCENARIOS, base_model="base"),  # the served base model's name is asked at start
    seed=int(os.environ.get("FTSERVE_SEED", "0")),
    timeout_s=float(os.environ.get("FTSERVE_REQUEST_TIMEOUT_S", "120")),
)
# Locust picks up the User classes of this module (RestChatUser, GrpcChatUser).
globals().update({user_class.__name__: user_class for user_class in configure_users(CONTEXT, SCENARIOS)})


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    CONTEXT.host = (environment.host or "http://127.0.0.1:3000").rstrip("/")
    base, _served = base_model_of(CONTEXT.host)
    CONTEXT.plan = RequestPlan(SCENARIOS, base)

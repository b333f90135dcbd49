"""Load tests: Locust users for REST and gRPC, scenarios, client-side timing, reports and SLO verdicts."""

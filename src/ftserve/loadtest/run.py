"""The Locust side of ``ftserve loadtest``, in a process of its own (gevent must patch it before anything
else is imported): ``python -m ftserve.loadtest.run SETTINGS.json RUN.json``.

Runs Locust headless through its library API (one local runner, the users of ``users.py``) for the run's
duration, prints a progress line every few seconds and Locust's statistics at the end, and writes every
request's sample for the parent to summarize.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.stats import print_stats  # noqa: E402

from ftserve.loadtest.prompts import RequestPlan  # noqa: E402
from ftserve.loadtest.samples import write_run  # noqa: E402
from ftserve.loadtest.settings import LoadtestConfig, load_scenarios  # noqa: E402
from ftserve.loadtest.users import LoadContext, configure_users  # noqa: E402

log = logging.getLogger("ftserve.loadtest")
PROGRESS_EVERY_S = 10.0


def _progress(context: LoadContext, env: Environment) -> None:
    while True:
        gevent.sleep(PROGRESS_EVERY_S)
        done = list(context.samples)
        failed = sum(not s.ok for s in done)
        users = env.runner.user_count if env.runner is not None else 0
        log.info("%5.0f s: %d users, %d requests, %d failed", time.perf_counter() - context.started, users,
                 len(done), failed)  # fmt: skip


def run(config: LoadtestConfig, base_model: str, out: Path) -> None:
    """Run the load and write its samples and measured duration to ``out``."""
    scenarios = load_scenarios(config.scenarios)
    plan = RequestPlan(scenarios, base_model)
    context = LoadContext(config.host, config.grpc_target, plan, config.seed, config.request_timeout_s)
    env = Environment(user_classes=configure_users(context, scenarios), host=config.host)
    runner = env.create_local_runner()
    progress = gevent.spawn(_progress, context, env)
    context.started = time.perf_counter()
    runner.start(config.users, spawn_rate=config.spawn_rate)

    def stop() -> None:
        context.stopping = True
        runner.quit()

    gevent.spawn_later(config.duration_s, stop)
    runner.greenlet.join()
    duration = time.perf_counter() - context.started
    progress.kill()
    print_stats(env.stats, current=False)
    write_run(out, duration, context.samples)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the progress lines
    settings = json.loads(Path(argv[0]).read_text())
    run(LoadtestConfig(**settings["config"]), settings["base_model"], Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

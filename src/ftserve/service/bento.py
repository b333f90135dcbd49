"""The BentoML service: a thin shell that loads the deployment, builds the engine and mounts ``/v1``.

Deployment settings come from ``bentos/default.yaml`` (or ``$FTSERVE_CONFIG``), overridden by
``FTSERVE_<SECTION>__<KEY>`` environment variables and by ``bentoml serve --arg key=value``
(``--arg config=bentos/other.yaml`` picks another file). BentoML itself serves ``/healthz``, ``/livez``,
``/readyz`` (ready once the engine runs) and ``/metrics``.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml

from ftserve.config import load_service_config
from ftserve.engine.protocol import create_engine
from ftserve.models import ModelStore
from ftserve.service import metrics
from ftserve.service.routes import build_app
from ftserve.service.serving import OpenAIServing

log = logging.getLogger("ftserve.service")

v1 = build_app()


def _arguments() -> dict[str, Any]:
    return dict(vars(bentoml.use_arguments()))


@bentoml.service(
    name="ftserve",
    workers=1,  # one engine per process; scale out with replicas (the engine batches inside itself)
    traffic={"timeout": 900, "max_concurrency": 512},
)
@bentoml.asgi_app(v1, path="/v1")
class FTServe:
    def __init__(self) -> None:
        overrides = _arguments()
        config_path = overrides.pop("config", None)
        self.config = load_service_config(config_path, overrides)
        model_dir = ModelStore(self.config.store.home).pull(self.config.model)
        self.engine = create_engine(model_dir, self.config.engine)
        self.engine.on_step = metrics.observe_engine
        v1.state.serving = OpenAIServing(self.engine, self.config)
        log.info("serving %s as %r with the %s engine", model_dir, self.config.base_name, self.config.engine.backend)

    @bentoml.on_startup
    async def start_engine(self) -> None:
        await self.engine.start()
        await v1.state.serving.load_startup_adapters()

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        await self.engine.stop()

    def __is_ready__(self) -> bool:
        return self.engine.ready

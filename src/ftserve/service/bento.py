"""The BentoML service: a thin shell that loads the deployment, builds the engine and mounts ``/v1``.

Deployment settings come from ``bentos/default.yaml`` (or ``$FTSERVE_CONFIG``), overridden by
``FTSERVE_<SECTION>__<KEY>`` environment variables and by ``bentoml serve --arg key=value``
(``--arg config=bentos/other.yaml`` picks another file). BentoML itself serves ``/healthz``, ``/livez``,
``/readyz`` (ready once the engine runs) and ``/metrics``. The gRPC API (``ftserve.v1``, port ``grpc.port``) starts
from the startup hook on the same engine; adapter admin needs the bearer token in ``$FTSERVE_ADMIN_TOKEN``.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml

from ftserve.config import EngineConfig, load_service_config
from ftserve.engine.loader import device_name
from ftserve.engine.protocol import create_engine
from ftserve.models import ModelStore, ModelStoreError
from ftserve.service.admin import AdminService
from ftserve.service.cost import CostMeter
from ftserve.service.grpc_server import GrpcServer
from ftserve.service.response_cache import ResponseCache
from ftserve.service.routes import build_app
from ftserve.service.serving import OpenAIServing

log = logging.getLogger("ftserve.service")

v1 = build_app()


def _arguments() -> dict[str, Any]:
    return dict(vars(bentoml.use_arguments()))


def with_draft_folder(config: EngineConfig, store: ModelStore) -> EngineConfig:
    """A draft model named as models are (a bundled name or a folder) becomes its folder. One that cannot
    be found is left for the engine, which logs why and serves without it."""
    spec = config.speculative
    if spec.draft_model is None:
        return config
    try:
        folder = store.resolve(spec.draft_model)
    except ModelStoreError as exc:
        log.warning("draft model: %s", exc)
        return config
    return config.model_copy(update={"speculative": spec.model_copy(update={"draft_model": str(folder)})})


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
        store = ModelStore(self.config.store.home)
        model_dir = store.pull(self.config.model)
        self.engine = create_engine(model_dir, with_draft_folder(self.config.engine, store))
        cache_config = self.config.response_cache
        cache = ResponseCache(cache_config.max_bytes, cache_config.ttl_s) if cache_config.enabled else None
        cost = CostMeter(self.config.pricing, device_name(self.config.engine.device))
        self.serving = OpenAIServing(self.engine, self.config, "rest", cache, cost)
        self.engine.on_step = self.serving.on_engine_step
        self.admin = AdminService.from_env(self.serving)
        v1.state.serving, v1.state.admin = self.serving, self.admin
        self.grpc: GrpcServer | None = None
        log.info("serving %s as %r with the %s engine", model_dir, self.config.base_name, self.config.engine.backend)

    @bentoml.on_startup
    async def start_engine(self) -> None:
        await self.engine.start()
        await self.serving.load_startup_adapters()
        if self.config.grpc.enabled:  # same process, same event loop, same engine as REST
            self.grpc = await GrpcServer.start(self.serving.for_protocol("grpc"), self.admin, self.config.grpc)

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        await self.engine.stop()

    def __is_ready__(self) -> bool:
        return self.engine.ready

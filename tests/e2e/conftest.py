"""A real ``bentoml serve`` of the project on a free loopback port, with the session's model store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftserve.bench.adapters import make_random_adapters
from ftserve.bench.serve_process import bentoml_serve

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240


ADAPTER = "e2e-lora"


ADMIN_TOKEN = "e2e-admin-token"


@dataclass(frozen=True)
class Server:
    url: str
    log: Path
    grpc_target: str
    model: str = "smollm2-135m-instruct"
    adapter: str = ADAPTER
    token: str = ADMIN_TOKEN


@pytest.fixture(scope="session")
def server(model_home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    adapters = tmp_path_factory.mktemp("adapters")
    make_random_adapters(model_dir, adapters, [ADAPTER], seed=11)
    log = tmp_path_factory.mktemp("serve") / "bentoml.log"
    env = {
        "FTSERVE_HOME": str(model_home),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),
        "FTSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    args = [
        # A small context window makes the "prompt too long" case cheap to build.
        "engine.max_model_len=512", "engine.max_num_seqs=4", f"adapter_dirs=[{adapters},{ROOT / 'adapters'}]",
    ]  # fmt: skip
    with bentoml_serve(ROOT, log, env, args, timeout_s=START_TIMEOUT_S) as served:
        yield Server(served.url, log, served.grpc_target)

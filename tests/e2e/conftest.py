"""A real ``bentoml serve`` of the project on a free loopback port, with the session's model store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ftserve.bench.adapters import make_random_adapters

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll /readyz until 200, failing fast if the server process dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling interval of a readiness probe, not synchronization of results
    raise RuntimeError(f"bentoml serve not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(model_home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    adapters = tmp_path_factory.mktemp("adapters")
    make_random_adapters(model_dir, adapters, [ADAPTER], seed=11)
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "bentoml.log"
    env = {
        **os.environ,
        "FTSERVE_HOME": str(model_home),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),
        "TOKENIZERS_PARALLELISM": "false",
        "FTSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    env.pop("FTSERVE_CONFIG", None)
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [
        str(bentoml), "serve", ".", "--host", "127.0.0.1", "--port", str(port),
        # A small context window makes the "prompt too long" case cheap to build.
        "--arg", "engine.max_model_len=512", "--arg", "engine.max_num_seqs=4",
        "--arg", f"adapter_dirs=[{adapters},{ROOT / 'adapters'}]", "--arg", f"grpc.port={grpc_port}",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url, log)
        yield Server(url, log, f"127.0.0.1:{grpc_port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

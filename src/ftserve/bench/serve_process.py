"""A real ``bentoml serve`` of this project in a child process, on loopback ports: started, polled until
``/readyz`` answers, stopped by its PID. Used by the soak benchmark and the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_POLL_S = 0.5  # interval of the readiness probe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Served:
    url: str
    grpc_target: str
    pid: int
    log: Path


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    """Poll /readyz until 200, failing fast if the server process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"bentoml serve not ready after {timeout_s:g}s:\n{log.read_text()[-4000:]}")


@contextmanager
def bentoml_serve(
    root: Path,
    log: Path,
    env: dict[str, str],
    args: Sequence[str] = (),
    timeout_s: float = 240.0,
    python: Path | None = None,
) -> Iterator[Served]:
    """``bentoml serve`` of the project at ``root`` with ``--arg`` overrides; stopped on exit.

    The deployment is the default one (``bentos/default.yaml``) unless ``env`` names another in
    ``FTSERVE_CONFIG``: one inherited from the caller's environment is dropped. ``python`` picks another
    virtual environment's ``bentoml`` (vLLM's, which pins its own torch)."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml = (python or Path(sys.executable)).with_name("bentoml")
    cmd = [str(bentoml), "serve", ".", "--host", "127.0.0.1", "--port", str(port), "--arg", f"grpc.port={grpc_port}"]
    for arg in args:
        cmd += ["--arg", arg]
    inherited = {k: v for k, v in os.environ.items() if k != "FTSERVE_CONFIG"}
    full_env = {**inherited, "TOKENIZERS_PARALLELISM": "false", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url, log, timeout_s)
        yield Served(url, f"127.0.0.1:{grpc_port}", proc.pid, log)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """End a child process we started: SIGTERM, then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

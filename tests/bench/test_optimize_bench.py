"""``ftserve bench optimize``: one row per variant with the issue's keys, measured in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftserve.bench.adapters import make_random_adapters
from ftserve.bench.optimize_bench import run_optimize_bench, summary
from ftserve.bench.variants import OptimizeBenchConfig
from ftserve.cli import main
from ftserve.train.formats import write_jsonl
from ftserve.train.tasks import get_task

KEYS = {"variant", "size_mb", "perplexity", "exact_match", "tokens_per_s_b1", "tokens_per_s_b16"}
TEXT = "The river runs past the mill and under the old stone bridge, then widens into the estuary. " * 3


@pytest.fixture(scope="module")
def config(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OptimizeBenchConfig:
    root = tmp_path_factory.mktemp("bench-optimize")
    make_random_adapters(model_dir, root, ["tiny"], seed=5)
    write_jsonl(root / "train.jsonl", get_task("support-router").generate(30, seed=0))
    (root / "router.yaml").write_text(
        f"name: router\ntask: support-router\ndata: {{train: {root / 'train.jsonl'}, heldout_fraction: 0.2}}\n"
    )
    (root / "text.txt").write_text(TEXT)
    return OptimizeBenchConfig(
        adapter=root / "tiny", train_config=root / "router.yaml", heldout=[], text=root / "text.txt",
        variants=["bf16", "merged", "int8"], max_items=2, max_new_tokens=3,
    )  # fmt: skip


def test_rows_carry_every_figure_for_every_variant(
    config: OptimizeBenchConfig, model_dir: Path, tmp_path: Path
) -> None:
    rows = run_optimize_bench(config, model_dir, tmp_path / "rows.json")
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert [r["variant"] for r in rows] == ["bf16", "merged", "int8"]
    for row in rows:
        assert set(row) >= KEYS, row
        assert row["perplexity"] > 1 and row["tokens_per_s_b1"] > 0 and row["tokens_per_s_b16"] > 0
        assert row["exact_match_items"] == 2 and 0 <= row["exact_match"] <= 1
    by = {r["variant"]: r for r in rows}
    assert by["bf16"]["adapter"] == "lora" and by["merged"]["adapter"] == "merged"
    assert by["int8"]["size_mb"] < by["merged"]["size_mb"]
    # LoRA applied unmerged and folded in are the same model: perplexities agree up to rounding.
    assert by["merged"]["perplexity"] == pytest.approx(by["bf16"]["perplexity"], rel=0.02)
    table = summary(rows)
    assert table.splitlines()[0].split()[:2] == ["variant", "dtype"] and len(table.splitlines()) == 4


def test_cli_refuses_a_missing_adapter_before_loading_anything(tmp_path: Path) -> None:
    code = main(["bench", "optimize", "--json", str(tmp_path / "r.json"), "--adapter", str(tmp_path / "none")])
    assert code != 0 and not (tmp_path / "r.json").exists()
